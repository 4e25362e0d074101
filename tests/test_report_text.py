"""What a user reads (issue 15 items 3, 4, 7, 9 and the 80-column quick start)."""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxslim.cli import main
from onnxslim.report import Report, shorten_middle

from conftest import SAMPLES

CNN = SAMPLES / "cnn_digits"


def _optimize(tmp_path, *flags, rc=0, name="out.onnx"):
    rep = tmp_path / "r.json"
    argv = ["optimize", str(CNN / "model.onnx"), "-o", str(tmp_path / name), "--report", str(rep), "-q", *flags]
    assert main(argv) == rc
    return Report.from_json(rep.read_text())


def test_qdq_nodes_are_counted_apart_and_the_quick_start_fits_80_columns(tmp_path):
    r = _optimize(tmp_path, "--quantize", "int8", "--calib", str(CNN / "calib"), "--check-data", str(CNN / "eval"))
    text = r.render_text(width=80)
    assert max(len(line) for line in text.splitlines()) <= 80
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if line.count("│") >= 4}
    assert "compute nodes" in rows and "Q/DQ nodes" in rows and "nodes" not in rows
    qdq = r.after.op_types.get("QuantizeLinear", 0) + r.after.op_types.get("DequantizeLinear", 0)
    assert f" {qdq} " in rows["Q/DQ nodes"] and qdq > 0
    assert "quantize_int8_static (lossy)" in text and "more pass(es) changed nothing" in text
    lossless = _optimize(tmp_path, name="plain.onnx").render_text(width=120)
    assert "│ nodes " in lossless and "Q/DQ" not in lossless


def test_facts_section_names_the_target_and_why_nodes_were_left(tmp_path):
    r = _optimize(tmp_path, "--prune", "0.5", "--calib", str(CNN / "calib"))
    text = " ".join(r.render_text(width=120).split())
    assert "facts:" in text
    assert "prune_by_magnitude: sensitivity allocation:" in text
    assert "node(s) left as they were: first or last layer (keep_first_last) (2)" in text
    q = _optimize(tmp_path, "--quantize", "int8", "--calib", str(CNN / "calib"), name="q.onnx")
    assert "quantize_int8_static: target " in " ".join(q.render_text().split())


def test_a_failed_gate_says_what_to_try_and_the_suggestion_is_a_valid_command(tmp_path):
    calib, data = str(CNN / "calib"), str(CNN / "eval")
    r = _optimize(tmp_path, "--prune", "0.9", "--calib", calib, "--check-data", data, rc=1)
    (prune, *rest) = r.next_steps
    assert prune.startswith("prune_by_magnitude: the layers its measurements blame most: ")
    assert "--explain" in rest[-1]
    flag = prune.split("keep them dense with ")[1].split(", or")[0]
    assert flag.startswith("--prune-option exclude_nodes=/")
    text = " ".join(r.render_text().split())
    assert "next step: prune_by_magnitude:" in text
    # The suggested option is accepted and spares exactly the blamed layers.
    r2 = _optimize(tmp_path, "--prune", "0.9", "--calib", calib, *flag.split(" ", 1), name="again.onnx")
    blamed = flag.split("=", 1)[1].split(",")
    pruned = {row["layer"] for p in r2.passes if p.name == "prune_by_magnitude" for row in p.layers}
    assert pruned and not pruned & set(blamed)


def _eight_outputs() -> onnx.ModelProto:
    names = [f"transpose_{i}_output_of_block_{i}_head" for i in range(8)]
    nodes = [helper.make_node("Relu", ["x"], [n], name=f"relu{i}") for i, n in enumerate(names)]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 4]) for n in names],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_eight_similar_output_names_stay_distinguishable(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(_eight_outputs(), str(path))
    np.savez(tmp_path / "d.npz", x=np.ones((2, 4), np.float32))
    rep = tmp_path / "r.json"
    assert main(["check", str(path), str(path), "--data", str(tmp_path / "d.npz"), "--report", str(rep), "-q"]) == 0
    text = Report(parity=json.loads(rep.read_text())).render_text(width=80)
    shown = [line.split("│")[2].strip() for line in text.splitlines() if line.startswith("│ CPU")]
    assert len(shown) == 8 and len(set(shown)) == 8
    assert shorten_middle("transpose_3_output_of_block_3_head", 20) == "transpose…ock_3_head"
    assert shorten_middle("short", 20) == "short"


def test_passes_listing_never_cuts_pass_names(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "eliminate_common_subexpressions " in out and "…" not in out.split("options")[0]
