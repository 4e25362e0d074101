"""quantize_int8_static writes what onnxruntime fuses into integer kernels (checked in the graph it really runs)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxslim.pipeline import optimize

from _fusion_testlib import model
from _graphs import stored_weight

Q = "quantize_int8_static:min_macs_for_activation_quantization=0,target=x86-vnni"


def _vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _calib(shapes: dict[str, tuple], n: int = 8, seed: int = 0) -> list[dict[str, np.ndarray]]:
    r = np.random.default_rng(seed)
    return [{k: r.standard_normal(s).astype(np.float32) for k, s in shapes.items()} for _ in range(n)]


def _ort_ops(m: onnx.ModelProto, tmp_path) -> Counter:
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "ort_optimized.onnx")
    ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _close(m, out, feed) -> float:
    """Cosine of the quantized model's Q/DQ arithmetic (onnxruntime's rewrites off) against the float model's.
    Not the fused integer kernels: on an AVX2 host without VNNI their u8 x s8 pair sums saturate at 16 bits
    for weights made for another target (8-bit, x86-vnni / arm), so their error depends on the host's CPU."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    got = ort.InferenceSession(out.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feed)[0]
    return _cosine(ref, got)


def test_conv_before_a_squeeze_into_a_float_add_still_gets_its_q(tmp_path):
    # Magika's Conv -> Squeeze -> Add (a residual with a float input): a Squeeze is transparent, but no Q
    # follows it, so without a Q on the Conv output onnxruntime ran a float Conv on dequantized weights.
    r = np.random.default_rng(1)
    w = (r.standard_normal((8, 4, 3, 1)) * 0.3).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 0, 1, 0]),
        helper.make_node("Squeeze", ["c", "axes"], ["s"]),
        helper.make_node("Add", ["s", "res"], ["y"]),
    ]
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array([3], np.int64), "axes")]
    m = model(nodes, [_vi("x", [1, 4, 16, 1]), _vi("res", [1, 8, 16])], [_vi("y", [1, 8, 16])], inits)
    calib = _calib({"x": (1, 4, 16, 1), "res": (1, 8, 16)})
    out, _ = optimize(m, [Q], calibration=calib)
    ops = _ort_ops(out, tmp_path)
    assert ops["QLinearConv"] == 1 and ops["Conv"] == 0 and ops["FusedConv"] == 0, ops
    assert _close(m, out, calib[0]) > 0.999


def test_conv_relu_conv_keeps_one_q_after_the_relu(tmp_path):
    # A transparent reader that a quantized node reads next still serves as the Q point: no extra pair.
    r = np.random.default_rng(2)
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["ra"]),
        helper.make_node("Conv", ["ra", "W2"], ["y"], pads=[1, 1, 1, 1]),
    ]
    inits = [
        numpy_helper.from_array((r.standard_normal(s) * 0.3).astype(np.float32), n)
        for n, s in (("W1", (8, 3, 3, 3)), ("W2", (4, 8, 3, 3)))
    ]
    m = model(nodes, [_vi("x", [1, 3, 8, 8])], [_vi("y", [1, 4, 8, 8])], inits)
    out, _ = optimize(m, [Q], calibration=_calib({"x": (1, 3, 8, 8)}))
    quantized = [n.input[0] for n in out.graph.node if n.op_type == "QuantizeLinear"]
    assert "a" not in quantized and "ra" in quantized, quantized


def test_gemm_with_a_row_bias_fuses_into_qgemm(tmp_path):
    # jax2tf / tf2onnx write Gemm biases as [1, N]; written 1-D int32 they let onnxruntime fuse QGemm (a float
    # [1, N] bias left the Gemm float, reading dequantized weights on every run).
    r = np.random.default_rng(3)
    nodes = [helper.make_node("Gemm", ["x", "W", "B"], ["y"])]
    inits = [
        numpy_helper.from_array((r.standard_normal((32, 16)) * 0.2).astype(np.float32), "W"),
        numpy_helper.from_array((r.standard_normal((1, 16)) * 0.1).astype(np.float32), "B"),
    ]
    m = model(nodes, [_vi("x", [4, 32])], [_vi("y", [4, 16])], inits)
    calib = _calib({"x": (4, 32)})
    out, rep = optimize(m, [Q], calibration=calib)
    assert rep.passes[-1].stats.get("biases_quantized") == 1
    ops = _ort_ops(out, tmp_path)
    assert ops["QGemm"] == 1 and ops["Gemm"] == 0, ops
    assert _close(m, out, calib[0]) > 0.999


def _depthwise_model() -> onnx.ModelProto:
    r = np.random.default_rng(4)
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["ra"]),
        helper.make_node("Conv", ["ra", "Wd"], ["d"], pads=[1, 1, 1, 1], group=8),  # depthwise
        helper.make_node("Relu", ["d"], ["rd"]),
        helper.make_node("Conv", ["rd", "W2"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array((r.standard_normal(s) * 0.3).astype(np.float32), n)
        for n, s in (("W1", (8, 3, 3, 3)), ("Wd", (8, 1, 3, 3)), ("W2", (4, 8, 1, 1)))
    ]
    return model(nodes, [_vi("x", [1, 3, 12, 12])], [_vi("y", [1, 4, 12, 12])], inits)


def test_depthwise_convs_get_int8_weights_only_on_x86_and_full_int8_elsewhere(tmp_path):
    m, calib = _depthwise_model(), _calib({"x": (1, 3, 12, 12)})
    base = "quantize_int8_static:min_macs_for_activation_quantization=0"
    for target, extra, depthwise_int8 in (
        ("x86-vnni", "", False),
        ("x86-avx2", "", False),
        ("arm-dotprod", "", True),
        ("x86-vnni", ",depthwise_conv=int8", True),
        ("arm", ",depthwise_conv=weight_only", False),
    ):
        out, rep = optimize(m, [f"{base},target={target}{extra}"], calibration=calib)
        stats = rep.passes[-1].stats
        assert stats.get("layers_weight_only_depthwise", 0) == (0 if depthwise_int8 else 1), (target, extra, stats)
        dw = next(n for n in out.graph.node if n.op_type == "Conv" and any(a.name == "group" for a in n.attribute))
        activation = next((n for n in out.graph.node if dw.input[0] in n.output), None)
        assert (activation is not None and activation.op_type == "DequantizeLinear") == depthwise_int8, (target, extra)
        kind, q = stored_weight(out, dw.input[1])
        assert q.data_type == TensorProto.INT8, (target, extra, kind)  # the file keeps int8 weights either way
        assert _close(m, out, calib[0]) > 0.999
    out, _ = optimize(m, [f"{base},target=x86-vnni"], calibration=calib)
    ops = _ort_ops(out, tmp_path)
    # the first Conv still runs an integer kernel (its output takes a Q although a float depthwise Conv reads
    # it after the Relu); the last one writes the graph output, which stays float
    assert ops["QLinearConv"] == 1, ops
