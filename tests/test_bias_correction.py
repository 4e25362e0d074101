"""Bias correction in quantize_int8_static and the per-channel means it reads from calibration."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim.calibration import Statistics, collect_statistics
from onnxslim.errors import UsageError
from onnxslim.graph import check_model
from onnxslim.pipeline import DEFAULT_PASSES, optimize

from _fusion_testlib import model
from _graphs import non_finite_inside
from conftest import MODELS, SAMPLES, eval_feeds

QUANT = "quantize_int8_static"
# The tiny test layers are below the default min_macs_for_activation_quantization (they would get weights only).
# Round to nearest: these tests measure bias correction alone (GPTQ rounding removes much of the same error).
FULL = f"{QUANT}:min_macs_for_activation_quantization=0,weight_rounding=nearest"


def _model(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    return model(nodes, inputs, outputs, inits)


def _vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _run(m: onnx.ModelProto, feed) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feed)[0]


def _above_midpoints(shape, rng, axis=0) -> np.ndarray:
    """Weights just above the midpoints of their int8 grid (channel max = 127 steps): every weight rounds up,
    so the rounding error has a large mean that bias correction can cancel."""
    steps = rng.integers(0, 100, size=shape).astype(np.float64) + 0.5 + 0.05
    sl = [slice(None)] * len(shape)
    sl[1 if axis == 0 else 0] = 0
    if len(shape) > 2:
        sl[2:] = [0] * (len(shape) - 2)
    steps[tuple(sl)] = 127.0  # fixes the per-channel scale at 1 step
    scale = rng.uniform(0.005, 0.02, size=shape[axis])
    bshape = [1] * len(shape)
    bshape[axis] = -1
    return (steps * scale.reshape(bshape)).astype(np.float32)


def _errors(m, out_nc, out_bc, make_x, n=16) -> tuple[float, float]:
    rng = np.random.default_rng(99)
    e0 = e1 = 0.0
    for _ in range(n):
        x = make_x(rng)
        ref = _run(m, x)
        e0 += float(np.abs(_run(out_nc, x) - ref).mean())
        e1 += float(np.abs(_run(out_bc, x) - ref).mean())
    return e0 / n, e1 / n


# ------------------------------------------------------------------------------------------ calibration means
def test_collect_statistics_means_match_numpy(tmp_path):
    nodes = [helper.make_node("Div", ["x", "d"], ["t"]), helper.make_node("Relu", ["t"], ["y"])]
    m = _model(nodes, [_vi("x", [2, 3, 4]), _vi("d", [2, 3, 4])], [_vi("y", [2, 3, 4])], [])
    rng = np.random.default_rng(0)
    data = [
        {"x": rng.standard_normal((2, 3, 4)).astype(np.float32) + np.arange(3, dtype=np.float32)[:, None]}
        for _ in range(5)
    ]
    data[2]["x"][0, 1, 0] = np.nan  # non-finite values are left out
    feeds = non_finite_inside(data)  # made inside the model: data must be finite
    st = collect_statistics(m, feeds, ["t", "y"], means={"t": 1, "y": -1}, histograms=False)
    allx = np.stack([f["x"] for f in data])
    np.testing.assert_allclose(st["t"].channel_mean, np.nanmean(allx, axis=(0, 1, 3)), rtol=1e-6)
    np.testing.assert_allclose(st["y"].channel_mean, np.nanmean(np.maximum(allx, 0), axis=(0, 1, 2)), rtol=1e-6)
    assert st["t"].mean_axis == 1 and st["y"].mean_axis == -1
    assert collect_statistics(m, feeds, ["t"], histograms=False)["t"].channel_mean is None  # only when asked
    cache = tmp_path / "c.json"
    first = collect_statistics(m, feeds, ["t"], means={"t": 1}, histograms=False, cache=cache)
    assert Statistics.load(cache)["t"] == first["t"]
    again = collect_statistics(m, feeds, ["t"], means={"t": 1}, histograms=False, cache=cache)
    np.testing.assert_array_equal(again["t"].channel_mean, first["t"].channel_mean)
    with pytest.raises(UsageError, match="means names"):
        collect_statistics(m, feeds, ["t"], means={"z": 0})


# ------------------------------------------------------------------------------------------ tiny graphs
@pytest.mark.parametrize("group", [1, 4])
def test_conv_bias_correction_cancels_biased_rounding_error(group):
    rng = np.random.default_rng(3)
    w = _above_midpoints((8, 4 // group, 3, 3), rng)
    m = _model(
        [helper.make_node("Conv", ["x", "W", "B"], ["y"], group=group)],
        [_vi("x", [1, 4, 6, 6])],
        [_vi("y", [1, 8, 4, 4])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "B")],
    )

    def make_x(r):
        return {"x": r.uniform(0.0, 2.0, (1, 4, 6, 6)).astype(np.float32)}

    calib = [make_x(rng) for _ in range(16)]
    full = f"{FULL},target=x86-vnni,depthwise_conv=int8"  # group 4 here is depthwise: int8 asked for
    out_nc, _ = optimize(m, [f"{full},bias_correction=false"], calibration=calib)
    out_bc, rep = optimize(m, [f"{full},bias_correction=true"], calibration=calib)
    check_model(out_bc, full=True)
    assert rep.passes[0].stats["biases_corrected"] == 1 and rep.passes[0].stats["biases_quantized"] == 1
    e_nc, e_bc = _errors(m, out_nc, out_bc, make_x)
    assert e_bc < 0.3 * e_nc, (e_nc, e_bc)


@pytest.mark.parametrize("op", ["MatMul", "Gemm"])
def test_matmul_add_and_gemm_bias_correction(op):
    rng = np.random.default_rng(4)
    b = numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "B")
    if op == "Gemm":
        w = _above_midpoints((6, 16), rng, axis=0)  # transB=1: [N, K], channel axis 0
        nodes = [helper.make_node("Gemm", ["x", "W", "B"], ["y"], transB=1)]
    else:
        w = _above_midpoints((16, 6), rng, axis=1)
        nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "B"], ["y"])]
    m = _model(nodes, [_vi("x", [2, 16])], [_vi("y", [2, 6])], [numpy_helper.from_array(w, "W"), b])

    def make_x(r):
        return {"x": r.uniform(0.0, 2.0, (2, 16)).astype(np.float32)}

    calib = [make_x(rng) for _ in range(16)]
    out_nc, _ = optimize(m, [f"{FULL},target=x86-vnni,bias_correction=false"], calibration=calib)
    out_bc, rep = optimize(m, [f"{FULL},target=x86-vnni"], calibration=calib)  # on by default
    check_model(out_bc, full=True)
    assert rep.passes[0].stats["biases_corrected"] == 1
    e_nc, e_bc = _errors(m, out_nc, out_bc, make_x)
    assert e_bc < 0.3 * e_nc, (e_nc, e_bc)


def test_shared_bias_gets_a_private_corrected_copy():
    rng = np.random.default_rng(5)
    w1 = _above_midpoints((16, 6), rng, axis=1)
    b = rng.standard_normal(6).astype(np.float32)
    m = _model(
        [
            helper.make_node("MatMul", ["x", "W1"], ["h"]),
            helper.make_node("Add", ["h", "B"], ["a"]),
            helper.make_node("Add", ["a", "B"], ["y"]),
        ],  # B also read by a second Add
        [_vi("x", [2, 16])],
        [_vi("y", [2, 6])],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(b, "B")],
    )
    calib = [{"x": rng.uniform(0, 2, (2, 16)).astype(np.float32)} for _ in range(8)]
    out, rep = optimize(m, [f"{FULL},target=x86-vnni"], calibration=calib)
    assert rep.passes[0].stats["biases_corrected"] == 1
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    np.testing.assert_array_equal(inits["B"], b)  # the second Add still adds the original bias
    assert any(k.startswith("B_corrected") for k in inits)


# ------------------------------------------------------------------------------------------ sample model
def test_cnn_digits_bias_correction_lowers_output_error():
    entry = next(e for e in MODELS if e["name"] == "cnn_digits")
    src = SAMPLES / entry["path"]
    feeds = [{k: v for k, v in f.items() if not k.startswith("__")} for f in eval_feeds(entry)][:4]
    ref = [ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, f)[0] for f in feeds]
    errs = {}
    for bc in (False, True):
        # nearest rounding: GPTQ (the default) already removes the mean error this corrects (0.0283 either way)
        opts = f"target=x86-vnni,weight_rounding=nearest,bias_correction={str(bc).lower()}"
        out, rep = optimize(
            src, [*DEFAULT_PASSES, f"{QUANT}:{opts}"], calibration=SAMPLES / entry["calib"], on_pass_error="raise"
        )
        # 6 Conv; the 320-MAC head Gemm gets weights only (min_macs_for_activation_quantization), no bias to fix
        assert rep.passes[-1].stats.get("biases_corrected", 0) == (6 if bc else 0)
        # ORT's reference semantics (optimizations off): x86-vnni's full 8-bit weights would saturate the int8
        # kernels of a CPU without VNNI, and this test measures the quantization, not the kernels
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(out.SerializeToString(), so, providers=["CPUExecutionProvider"])
        errs[bc] = float(np.mean([np.abs(sess.run(None, f)[0] - r).mean() for f, r in zip(feeds, ref)]))
    # Measured on all 450 eval samples: mean |logit error| 0.0421 -> 0.0274 (x86-vnni).
    assert errs[True] < 0.85 * errs[False], errs


def test_layers_rounded_by_gptq_can_be_left_to_gptq():
    rng = np.random.default_rng(9)
    m = _model(
        [helper.make_node("Gemm", ["x", "W", "B"], ["y"])],
        [_vi("x", [4, 8])],
        [_vi("y", [4, 6])],
        [
            numpy_helper.from_array((rng.standard_normal((8, 6)) * 0.3).astype(np.float32), "W"),
            numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "B"),
        ],
    )
    calib = [{"x": rng.uniform(0.0, 2.0, (4, 8)).astype(np.float32)} for _ in range(8)]
    gptq = f"{QUANT}:min_macs_for_activation_quantization=0,weight_rounding=gptq,target=x86-vnni"
    _, on = optimize(m, [gptq], calibration=calib)
    _, off = optimize(m, [f"{gptq},bias_correction_after_gptq=false"], calibration=calib)
    assert on.passes[0].stats["weights_gptq_rounded"] == 1 and on.passes[0].stats["biases_corrected"] == 1
    assert "biases_corrected" not in off.passes[0].stats and off.passes[0].stats["biases_left_to_gptq"] == 1
