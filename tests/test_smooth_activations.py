"""smooth_activations: SmoothQuant scale migration, exact in float, lower int8 error on outlier channels."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim.errors import UsageError
from onnxslim.passes.quantize.smooth_activations import SmoothActivations
from onnxslim.pipeline import optimize
from onnxslim.testing import check_pass_contract

from _fusion_testlib import model

C, N = 16, 12
INT8 = "quantize_int8_static:target=x86-vnni,bias_correction=false,weight_rounding=nearest"


def _vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _outlier_gamma() -> np.ndarray:
    g = np.full(C, 0.5, np.float32)
    g[3], g[11] = 40.0, -25.0  # two outlier channels, as LayerNorm outputs of trained transformers have
    return g


def _weights(rng, k: int) -> list[np.ndarray]:
    return [(rng.standard_normal((C, N)) * 0.2).astype(np.float32) for _ in range(k)]


def _ln_model(decomposed: bool = False, residual: bool = False) -> onnx.ModelProto:
    """x -> LayerNorm(gamma with outliers) -> {MatMul q, MatMul k, Shape}; or the Mul/Add form of opset < 17."""
    rng = np.random.default_rng(0)
    wq, wk = _weights(rng, 2)
    inits = [
        numpy_helper.from_array(_outlier_gamma(), "gamma"),
        numpy_helper.from_array((rng.standard_normal(C) * 0.1).astype(np.float32), "beta"),
        numpy_helper.from_array(wq, "Wq"),
        numpy_helper.from_array(wk, "Wk"),
    ]
    if decomposed:  # the normalization itself is a graph input here: only the affine tail matters
        nodes = [helper.make_node("Mul", ["x", "gamma"], ["g"]), helper.make_node("Add", ["g", "beta"], ["h"])]
    else:
        nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], axis=-1)]
    nodes += [
        helper.make_node("MatMul", ["h", "Wq"], ["q"]),
        helper.make_node("MatMul", ["h", "Wk"], ["k"]),
        helper.make_node("Shape", ["h"], ["hs"]),
    ]
    outputs = [_vi("q", [2, 5, N]), _vi("k", [2, 5, N]), helper.make_tensor_value_info("hs", TensorProto.INT64, [3])]
    if residual:  # a pre-LN block's residual reads the LayerNorm output too: nothing may change it
        nodes.append(helper.make_node("Add", ["h", "x"], ["r"]))
        outputs.append(_vi("r", [2, 5, C]))
    return model(nodes, [_vi("x", [2, 5, C])], outputs, inits)


def _feeds(n: int = 8, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((2, 5, C)).astype(np.float32)} for _ in range(n)]


def _run(m: onnx.ModelProto, feeds) -> list[list[np.ndarray]]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return [s.run(None, f) for f in feeds]


def _inits(m: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


def test_layernorm_scales_move_into_both_weights_exactly():
    m = _ln_model()
    out, rep = optimize(m, ["smooth_activations"], calibration=_feeds(), on_pass_error="raise")
    stats = rep.passes[0].stats
    assert stats["tensors_smoothed"] == 1 and stats["layers_smoothed"] == 2
    before, after = _run(m, _feeds(3, seed=7)), _run(out, _feeds(3, seed=7))
    for a, b in zip(before, after):
        for x, y in zip(a, b):
            np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-5)
    # the outlier channels of the LayerNorm output are tamed: its channel ranges are closer together
    g0, g1 = np.abs(_outlier_gamma()), np.abs(_inits(out)["gamma"])
    assert g1.max() / np.median(g1) < 0.5 * g0.max() / np.median(g0)
    # ... and both weights took the same per-row factor (one s for the tensor all readers share)
    w0, w1 = _inits(m), _inits(out)
    s_q = np.abs(w1["Wq"]).max(axis=1) / np.abs(w0["Wq"]).max(axis=1)
    s_k = np.abs(w1["Wk"]).max(axis=1) / np.abs(w0["Wk"]).max(axis=1)
    np.testing.assert_allclose(s_q, s_k, rtol=1e-5)
    np.testing.assert_allclose(s_q, g0 / g1, rtol=1e-4)


def test_decomposed_layernorm_tail_is_folded_exactly():
    m = _ln_model(decomposed=True)
    out, rep = optimize(m, ["smooth_activations"], calibration=_feeds(), on_pass_error="raise")
    assert rep.passes[0].stats["tensors_smoothed"] == 1
    for a, b in zip(_run(m, _feeds(3, 9)), _run(out, _feeds(3, 9))):
        for x, y in zip(a, b):
            np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-5)
    assert not np.allclose(_inits(out)["beta"], _inits(m)["beta"])  # beta takes the division too


def test_smoothing_lowers_int8_error_on_outlier_channels():
    m = _ln_model()
    feeds, held = _feeds(16), _feeds(6, seed=5)
    ref = _run(m, held)
    plain, _ = optimize(m, [INT8], calibration=feeds)
    smooth, _ = optimize(m, ["smooth_activations", INT8], calibration=feeds)

    def err(q):
        return float(np.mean([np.abs(y - x).mean() for a, b in zip(ref, _run(q, held)) for x, y in zip(a[:2], b[:2])]))

    assert err(smooth) < 0.7 * err(plain)


def test_a_residual_reader_leaves_the_tensor_alone():
    m = _ln_model(residual=True)
    out, rep = optimize(m, ["smooth_activations"], calibration=_feeds(), on_pass_error="raise")
    assert not rep.passes[0].modified
    assert np.array_equal(_inits(out)["gamma"], _outlier_gamma())


def test_an_input_from_a_non_affine_op_is_skipped_with_its_reason():
    m = _ln_model()
    relu = helper.make_node("Relu", ["x"], ["xr"])
    m.graph.node.insert(0, relu)
    m.graph.node.append(helper.make_node("MatMul", ["xr", "Wq"], ["z"]))
    m.graph.output.append(_vi("z", [2, 5, N]))
    out, rep = optimize(m, ["smooth_activations"], calibration=_feeds(), on_pass_error="raise")
    rec = rep.passes[0]
    assert rec.modified and rec.stats["tensors_smoothed"] == 1  # the LayerNorm site still smooths
    assert any("no per-channel affine op" in s["reason"] for s in rec.skipped)
    for a, b in zip(_run(m, _feeds(2, 3)), _run(out, _feeds(2, 3))):
        for x, y in zip(a, b):
            np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-5)


def test_no_outliers_no_change_and_no_data_is_an_error():
    m = _ln_model()
    _, rep = optimize(m, ["smooth_activations:min_ratio=1000"], calibration=_feeds())
    assert not rep.passes[0].modified and rep.passes[0].stats["tensors_without_outliers"] == 1
    with pytest.raises(UsageError, match="need calibration data"):
        optimize(m, ["smooth_activations"])


def test_a_shared_gamma_is_copied_not_edited():
    m = _ln_model(decomposed=True)
    m.graph.node.append(helper.make_node("Mul", ["x", "gamma"], ["other"]))
    m.graph.output.append(_vi("other", [2, 5, C]))
    out, rep = optimize(m, ["smooth_activations"], calibration=_feeds(), on_pass_error="raise")
    assert rep.passes[0].modified
    other = next(n for n in out.graph.node if n.output[0] == "other")
    np.testing.assert_array_equal(_inits(out)[other.input[1]], _outlier_gamma())
    for a, b in zip(_run(m, _feeds(2, 4)), _run(out, _feeds(2, 4))):
        for x, y in zip(a, b):
            np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-5)


def test_pass_contract():
    check_pass_contract(
        SmoothActivations(), _ln_model(), _feeds(3, seed=11), calibration=_feeds(), expect_modified=True
    )


def test_cli_smooth_runs_before_int8_and_without_int8_is_refused(capsys, tmp_path):
    import json

    from onnxslim.cli import main

    src, calib, out, rep = tmp_path / "m.onnx", tmp_path / "calib", tmp_path / "o.onnx", tmp_path / "r.json"
    onnx.save(_ln_model(), src)
    calib.mkdir()
    for i, f in enumerate(_feeds()):
        np.savez(calib / f"{i}.npz", **f)
    args = ["optimize", src, "-o", out, "--calib", calib, "--report", rep]
    code = main([str(a) for a in [*args, "--quantize", "int8", "--smooth", "0.6", "--target-cpu", "x86-vnni"]])
    assert code == 0, capsys.readouterr()
    passes = json.loads(rep.read_text())["passes"]
    names = [p["name"] for p in passes]
    assert names.index("smooth_activations") < names.index("quantize_int8_static")
    smooth = passes[names.index("smooth_activations")]
    assert smooth["modified"] and smooth["options"]["alpha"] == 0.6
    out.unlink()
    capsys.readouterr()
    assert main([str(a) for a in [*args, "--smooth"]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--quantize int8" in err[0] and not out.exists()
