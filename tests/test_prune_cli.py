"""The pruning shortcuts of the CLI: --prune, --prune-nm, --prune-channels, --prune-option; with --quantize int8."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxslim.cli import main
from onnxslim.pipeline import optimize

from conftest import SAMPLES

CNN = SAMPLES / "cnn_digits" / "model.onnx"
CALIB = SAMPLES / "cnn_digits" / "calib"
EVAL = SAMPLES / "cnn_digits" / "eval"


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _passes(report_path):
    return {p["name"]: p for p in json.loads(report_path.read_text())["passes"]}


def test_prune_with_calibration_passes_its_gate_and_shrinks_the_file(capsys, tmp_path):
    out = tmp_path / "p.onnx"
    code, text, err = run_cli(
        capsys, "optimize", CNN, "-o", out, "--prune", "0.5", "--calib", CALIB, "--check-data", EVAL,
        "--report", tmp_path / "r.json",
    )  # fmt: skip
    assert code == 0, text + err
    passes = _passes(tmp_path / "r.json")
    # with --calib the pruned weights are recovered by distillation by default, before packing
    assert list(passes)[-3:] == ["prune_by_magnitude", "distill_layers", "pack_sparse_weights"]
    assert passes["distill_layers"]["stats"]["weights_refit"] >= 1
    assert passes["prune_by_magnitude"]["stats"]["layers_pruned"] >= 3
    assert {d["method"] for d in passes["prune_by_magnitude"]["layers"]} == {"sparsegpt"}
    assert "prune_by_magnitude: per layer" in text
    lossless = tmp_path / "l.onnx"
    assert run_cli(capsys, "optimize", CNN, "-o", lossless)[0] == 0
    assert out.stat().st_size < 0.7 * lossless.stat().st_size


def test_no_distill_leaves_the_recovery_out_and_channels_get_none_by_default(capsys, tmp_path):
    for flags, want in (
        (["--prune", "0.5", "--no-distill"], ["prune_by_magnitude", "pack_sparse_weights"]),
        (["--prune-channels", "0.25"], ["prune_channels"]),
        (["--prune-channels", "0.25", "--distill"], ["prune_channels", "distill_layers"]),
    ):
        report = tmp_path / "r.json"
        code, _, err = run_cli(capsys, "optimize", CNN, "-o", tmp_path / "p.onnx", *flags, "--calib", CALIB,
                               "--no-latency", "--report", report)  # fmt: skip
        assert code == 0, err
        assert (
            list(_passes(report))[-len(want) :] == want and "distill_layers" not in list(_passes(report))[: -len(want)]
        )


def test_prune_options_go_to_the_pass_that_has_them(capsys, tmp_path):
    code, _, err = run_cli(
        capsys, "optimize", CNN, "-o", tmp_path / "p.onnx", "--prune-nm", "2:4", "--prune-option",
        "importance=magnitude", "--prune-option", "reconstruct=none", "--report", tmp_path / "r.json",
    )  # fmt: skip
    assert code == 0, err
    p = _passes(tmp_path / "r.json")["prune_by_magnitude"]
    assert p["options"]["pattern"] == "2:4" and p["options"]["reconstruct"] == "none"
    assert {d["method"] for d in p["layers"]} == {"magnitude"}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prune", "1.0"], "sparsity must be in [0, 1)"),
        (["--prune", "-0.2"], "sparsity must be in [0, 1)"),
        (["--prune-nm", "4:2"], "1 <= N < M"),
        (["--prune-nm", "2:2"], "1 <= N < M"),
        (["--prune", "0.5", "--prune-nm", "2:4"], "give one of them"),
        (["--prune-option", "sparsity=0.5"], "--prune-option applies to pruning"),
        (["--prune", "0.5", "--prune-option", "colour=red"], "has no option 'colour'"),
        (["--prune-channels", "1.5"], "fraction"),
    ],
)
def test_bad_pruning_flags_exit_2_with_one_line_and_write_nothing(capsys, tmp_path, args, message):
    out = tmp_path / "o.onnx"
    code, _, err = run_cli(capsys, "optimize", CNN, "-o", out, *args)
    assert code == 2
    line = err.strip()
    assert "\n" not in line and message in line, line
    assert not out.exists() and not list(tmp_path.iterdir())


def test_int8_after_pruning_keeps_the_zeros_zero(tmp_path):
    """--prune 0.5 --quantize int8: every pruned float weight is zero in its int8 form too (GPTQ included)."""
    pruned, _ = optimize(str(CNN), ["prune_by_magnitude:sparsity=0.5"], calibration=CALIB, fixed_point=False)
    zeros = {t.name: numpy_helper.to_array(t) == 0 for t in pruned.graph.initializer if t.name.endswith("conv2.weight")}
    assert zeros and all(z.mean() >= 0.2 for z in zeros.values())  # the allocation spreads the 50%
    quant, _ = optimize(
        pruned, ["quantize_int8_static:target=x86-vnni"], calibration=CALIB, fixed_point=False, on_pass_error="raise"
    )
    int8 = {t.name: numpy_helper.to_array(t) for t in quant.graph.initializer if t.data_type == onnx.TensorProto.INT8}
    for name, z in zeros.items():
        q = next(v for k, v in int8.items() if k.startswith(name) and v.shape == z.shape)
        assert (q[z] == 0).all()


def test_cli_prune_then_quantize_runs_and_packs_int8_weights(capsys, tmp_path):
    out = tmp_path / "pq.onnx"
    code, text, err = run_cli(
        capsys, "optimize", CNN, "-o", out, "--prune", "0.5", "--quantize", "int8", "--target-cpu", "x86-vnni",
        "--calib", CALIB, "--report", tmp_path / "r.json",
    )  # fmt: skip
    assert code == 0, text + err
    names = list(_passes(tmp_path / "r.json"))
    assert names.index("prune_by_magnitude") < names.index("quantize_int8_static") < names.index("pack_sparse_weights")
    m = onnx.load(out)
    assert "BitShift" in {n.op_type for n in m.graph.node}
    x = np.load(sorted(EVAL.glob("*.npz"))[0])["input"]
    import onnxruntime as ort

    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x})
