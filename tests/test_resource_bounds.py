"""What a pass materializes is bounded before it is computed; an option raises the bound."""

from __future__ import annotations

import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import onnxslim
from onnxslim.cli import main
from onnxslim.passes.slim.fold_constants import FoldConstants


def _expand(n: int) -> onnx.ModelProto:
    """A tiny model whose Expand makes an n x n float tensor from a scalar (all inputs constant)."""
    g = helper.make_graph(
        [
            helper.make_node("Expand", ["one", "shape"], ["big"], name="expand"),
            helper.make_node("ReduceSum", ["big"], ["s"], name="sum", keepdims=0),
            helper.make_node("Add", ["X", "s"], ["Y"], name="add"),
        ],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1])],
        [
            numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one"),
            numpy_helper.from_array(np.array([n, n], dtype=np.int64), "shape"),
        ],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_huge_expand_is_never_evaluated(tmp_path, capsys, monkeypatch):
    evaluated = []
    real = FoldConstants._run_nodes

    def spy(self, ctx, nodes):
        evaluated.extend(n.name for n in nodes)
        return real(self, ctx, nodes)

    monkeypatch.setattr(FoldConstants, "_run_nodes", spy)
    src = tmp_path / "bomb.onnx"
    onnx.save(_expand(60000), str(src))
    assert src.stat().st_size < 400
    t0 = time.perf_counter()
    assert main(["optimize", str(src), "-o", str(tmp_path / "out.onnx"), "--json"]) == 0
    assert time.perf_counter() - t0 < 15
    assert "expand" not in evaluated
    report = capsys.readouterr().out
    assert "max_bytes" in report and "14400000000 bytes" in report


def test_the_bound_applies_even_when_growth_is_allowed_and_the_option_raises_it():
    model = _expand(100)  # 40000 bytes
    _, report = onnxslim.optimize(model, ["fold_constants:allow_growth=true,max_bytes=1000"])
    rec = report.passes[0]
    assert any("max_bytes=1000" in s["reason"] for s in rec.skipped), rec.skipped
    out, report = onnxslim.optimize(model, ["fold_constants:allow_growth=true,max_bytes=100000"])
    assert report.passes[0].stats.get("nodes_folded", 0) >= 1
    assert "Expand" not in {n.op_type for n in out.graph.node}


def test_latency_is_not_measured_on_a_model_that_materializes_gigabytes(tmp_path, capsys):
    # The default latency measurement of `optimize` runs the models: the 60000 x 60000 Expand (14.4 GB) would take
    # the machine's memory. Shape inference finds it first; the report says why latency was not measured.
    path = tmp_path / "m.onnx"
    onnx.save(_expand(60000), str(path))
    rep = tmp_path / "r.json"
    assert main(["optimize", str(path), "-o", str(tmp_path / "o.onnx"), "--report", str(rep), "-q"]) == 0
    import json

    lat = json.loads(rep.read_text())["latency"]
    assert not lat["measured"] and "13.4 GiB tensor ('big')" in lat["reason"]
    # A small one is measured as usual.
    onnx.save(_expand(64), str(path))
    assert main(["optimize", str(path), "-o", str(tmp_path / "o.onnx"), "--report", str(rep), "-q"]) == 0
    assert json.loads(rep.read_text())["latency"]["measured"]
