"""Weight rounding (GPTQ vs nearest), the Gram matrices it reads from calibration, and the Cast + Mul encoding
of weights-only layers."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim.calibration import Statistics, collect_statistics
from onnxslim.errors import BadInputError
from onnxslim.graph import check_model
from onnxslim.model_save import save_model
from onnxslim.passes.quantize._gptq import WeightQuantizer, gptq_round
from onnxslim.passes.quantize._math import quantize_weight
from onnxslim.pipeline import DEFAULT_PASSES, optimize

from _fusion_testlib import model
from _graphs import non_finite_inside, stored_weight
from conftest import MODELS, SAMPLES, eval_feeds

QUANT = "quantize_int8_static"


def _model(nodes, inputs, outputs, inits, opset=17) -> onnx.ModelProto:
    return model(nodes, inputs, outputs, inits, opset=opset)


def _vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _run(m: onnx.ModelProto, feed, optimize_graph=False) -> np.ndarray:
    so = ort.SessionOptions()
    if not optimize_graph:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feed)[0]


def _correlated(rng, n, k, rank=3) -> np.ndarray:
    """Inputs with strongly correlated features (low rank + a little noise), where GPTQ's error feedback pays."""
    basis = rng.standard_normal((rank, k))
    return (rng.standard_normal((n, rank)) @ basis + 0.05 * rng.standard_normal((n, k))).astype(np.float32)


def _output_error(w, q, scale, x) -> float:
    wq = q.astype(np.float64) * scale[:, None]
    return float(np.mean(((w - wq) @ x.T) ** 2))


# -- the algorithm --------------------------------------------------------------------------------------
def test_gptq_lowers_the_output_error_on_correlated_inputs_and_stays_in_range():
    rng = np.random.default_rng(0)
    data = _correlated(rng, 768, 32).astype(np.float64)
    x, held_out = data[:512], data[512:]
    w = rng.standard_normal((16, 32))
    scale = np.abs(w).max(axis=1) / 127
    h = x.T @ x / len(x)
    nearest = np.clip(np.round(w / scale[:, None]), -127, 127)
    q = gptq_round(w, scale, h, 127)
    assert q.min() >= -127 and q.max() <= 127 and np.array_equal(q, np.round(q))
    e_near, e_gptq = _output_error(w, nearest, scale, held_out), _output_error(w, q, scale, held_out)
    assert e_gptq < 0.5 * e_near, (e_near, e_gptq)


def test_dead_columns_keep_nearest_values():
    # A feature that is always 0 in calibration (an image border): GPTQ must not zero its weights, since other
    # data may feed it.
    rng = np.random.default_rng(1)
    x = _correlated(rng, 256, 8).astype(np.float64)
    x[:, 3] = 0.0
    w = rng.standard_normal((4, 8))
    scale = np.abs(w).max(axis=1) / 127
    q = gptq_round(w, scale, x.T @ x, 127)
    np.testing.assert_array_equal(q[:, 3], np.clip(np.round(w[:, 3] / scale), -127, 127))


def test_quantizer_rounds_to_nearest_without_a_hessian_and_is_keyed_by_content():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((6, 5)).astype(np.float32)
    wq = WeightQuantizer(127)
    q, s = wq.quantize(w, 1)
    q0, s0 = quantize_weight(w, 1, 127)
    assert np.array_equal(q, q0) and np.array_equal(s, s0) and wq.gptq_weights == 0
    x = _correlated(rng, 128, 6).astype(np.float64)
    wq.register(w.copy(), 1, (0,), x.T @ x / len(x))  # MatMul layout [K, N]: input features on axis 0
    wq.cache.clear()
    q1, s1 = wq.quantize(w.copy(), 1)  # another array with the same bytes
    assert wq.gptq_weights == 1 and np.array_equal(s1, s0) and q1.dtype == np.int8 and not np.array_equal(q1, q0)


# -- calibration: Gram matrices --------------------------------------------------------------------------
def test_gram_equals_numpy_and_round_trips(tmp_path):
    nodes = [helper.make_node("Div", ["x", "d"], ["t"]), helper.make_node("Relu", ["t"], ["y"])]
    m = _model(nodes, [_vi("x", [None, 3, 4]), _vi("d", [None, 3, 4])], [_vi("y", None)], [])
    rng = np.random.default_rng(3)
    data = [{"x": rng.standard_normal((b, 3, 4)).astype(np.float32)} for b in (1, 2, 5)]
    data[1]["x"][0, 1, 2] = np.nan  # that row (one vector along axis 1) is left out
    feeds = non_finite_inside(data)  # the NaN is made inside the model (data must be finite)
    stats = collect_statistics(m, feeds, ["y", "t"], grams={"y": 1, "t": -1}, histograms=["t"])
    rows = np.concatenate([np.maximum(f["x"], 0).transpose(0, 2, 1).reshape(-1, 3) for f in data]).astype(np.float64)
    rows = rows[np.isfinite(rows).all(axis=1)]
    np.testing.assert_allclose(stats["y"].gram, rows.T @ rows, rtol=1e-12)
    assert stats["y"].gram_rows == len(rows) == 8 * 4 - 1 and stats["y"].hist is None
    assert stats["t"].gram.shape == (4, 4) and stats["t"].hist is not None
    stats.save(tmp_path / "s.json")
    assert Statistics.load(tmp_path / "s.json") == stats
    # the cache serves the same request, and is not used for another Gram axis
    cache = tmp_path / "c.json"
    collect_statistics(m, feeds, ["y"], grams={"y": 1}, cache=cache)
    calls: list = []
    collect_statistics(m, feeds, ["y"], grams={"y": 1}, cache=cache, progress=lambda d, t: calls.append(d))
    assert calls == []
    collect_statistics(m, feeds, ["y"], grams={"y": 2}, cache=cache, progress=lambda d, t: calls.append(d))
    assert calls


def test_gram_needs_a_fixed_channel_count():
    m = _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", [None, None])], [_vi("y", None)], [])
    feeds = [{"x": np.ones((2, 3), np.float32)}, {"x": np.ones((2, 4), np.float32)}]
    with pytest.raises(BadInputError, match="fixed channel count"):
        collect_statistics(m, feeds, ["y"], grams={"y": 1})


# -- the pass -----------------------------------------------------------------------------------------------
def _matmul_model(rng, k=48, n=24):
    w = rng.standard_normal((k, n)).astype(np.float32)
    return _model(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        [_vi("x", [None, k])],
        [_vi("y", None)],
        [numpy_helper.from_array(w, "W")],
    )


@pytest.mark.parametrize("full", [False, True])
def test_gptq_in_the_pass_lowers_held_out_error(full):
    rng = np.random.default_rng(4)
    m = _matmul_model(rng)
    data = _correlated(rng, 96, 48)
    calib = [{"x": data[i : i + 4]} for i in range(0, 64, 4)]
    held_out = {"x": data[64:]}
    q = f"{QUANT}:min_macs_for_activation_quantization={0 if full else 10**9},bias_correction=false"
    near, _ = optimize(m, [f"{q},weight_rounding=nearest"], calibration=calib)
    gptq, rep = optimize(m, [q], calibration=calib)  # gptq is the default
    assert rep.passes[0].stats["weights_gptq_rounded"] == 1
    ref = _run(m, held_out)
    e_near = float(np.mean((_run(near, held_out) - ref) ** 2))
    e_gptq = float(np.mean((_run(gptq, held_out) - ref) ** 2))
    # weights only: the weight rounding is the whole error; with uint8 activations their rounding dominates
    assert e_gptq < (0.99 if full else 0.7) * e_near, (e_near, e_gptq)


def test_lstm_w_and_r_are_gptq_rounded_and_run():
    rng = np.random.default_rng(5)
    hidden, inp = 8, 6
    lw = (rng.standard_normal((1, 4 * hidden, inp)) * 0.5).astype(np.float32)
    lr = (rng.standard_normal((1, 4 * hidden, hidden)) * 0.5).astype(np.float32)
    m = _model(
        [helper.make_node("LSTM", ["x", "W", "R"], ["y", "h"], hidden_size=hidden)],
        [_vi("x", [5, None, inp])],
        [_vi("h", None)],
        [numpy_helper.from_array(lw, "W"), numpy_helper.from_array(lr, "R")],
        opset=12,
    )
    calib = [{"x": rng.standard_normal((5, 2, inp)).astype(np.float32)} for _ in range(8)]
    out, rep = optimize(m, [QUANT], calibration=calib)
    check_model(out, full=True)
    assert rep.passes[0].stats["weights_gptq_rounded"] == 2
    lstm = next(n for n in out.graph.node if n.op_type == "LSTM")
    assert [stored_weight(out, lstm.input[i])[0] for i in (1, 2)] == ["cast_mul", "cast_mul"]
    x = calib[0]
    ref = _run(m, x)
    np.testing.assert_allclose(_run(out, x), ref, atol=0.05)


def test_weights_only_cast_mul_is_folded_by_onnxruntime_and_kept_int8_by_our_pipeline(tmp_path):
    rng = np.random.default_rng(6)
    m = _matmul_model(rng, 8, 4)  # 32 MACs: weights only by default
    calib = [{"x": rng.standard_normal((2, 8)).astype(np.float32)} for _ in range(4)]
    out, _ = optimize(m, [QUANT], calibration=calib)
    assert stored_weight(out, out.graph.node[-1].input[1])[0] == "cast_mul"
    # onnxruntime folds Cast + Mul into a float initializer at load: the layer runs as a plain float MatMul
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(out.SerializeToString(), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert ops == ["MatMul"], ops
    # the default (lossless) pipeline does not fold it back into float (that would grow the file 4x)
    again, _ = optimize(out, DEFAULT_PASSES)
    assert stored_weight(again, again.graph.node[-1].input[1])[0] == "cast_mul"


@pytest.mark.parametrize("encoding", ["cast_mul", "dequantize_linear"])
def test_weight_only_encodings_give_the_same_values(encoding):
    rng = np.random.default_rng(7)
    m = _matmul_model(rng, 8, 4)
    calib = [{"x": rng.standard_normal((2, 8)).astype(np.float32)} for _ in range(4)]
    # target=x86-vnni: the numpy reference below uses full 8-bit weights
    out, _ = optimize(
        m, [f"{QUANT}:weight_only_encoding={encoding},weight_rounding=nearest,target=x86-vnni"], calibration=calib
    )
    assert stored_weight(out, out.graph.node[-1].input[1])[0] == encoding
    x = {"x": calib[0]["x"]}
    w = numpy_helper.to_array(m.graph.initializer[0])
    q, s = quantize_weight(w, 1)
    np.testing.assert_allclose(_run(out, x), x["x"] @ (q * s), rtol=1e-6, atol=1e-6)


def test_gru_digits_gptq_keeps_fp32_predictions():
    # 450 held-out samples. Round to nearest flips one prediction of the int8-weight LSTM (0.9733 vs fp32
    # 0.9756); GPTQ keeps every fp32 prediction and lowers the mean logit error.
    entry = next(e for e in MODELS if e["name"] == "gru_digits")
    feeds = eval_feeds(entry)
    calib = SAMPLES / entry["calib"]
    src = onnx.load(str(SAMPLES / entry["path"]))
    near, _ = optimize(src, [*DEFAULT_PASSES, f"{QUANT}:weight_rounding=nearest"], calibration=calib)
    gptq, rep = optimize(src, [*DEFAULT_PASSES, QUANT], calibration=calib)
    assert rep.passes[-1].stats["weights_gptq_rounded"] >= 2

    def logits(m):
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return np.concatenate([sess.run(None, {"input": f["input"]})[0] for f in feeds])

    ref, y_near, y_gptq = logits(src), logits(near), logits(gptq)
    assert np.array_equal(y_gptq.argmax(1), ref.argmax(1))
    assert np.abs(y_gptq - ref).mean() < np.abs(y_near - ref).mean()


def test_external_data_model_quantizes_like_the_inline_one(tmp_path):
    # Calibration reads an external-data model's weights through onnxruntime from disk (see test_calibration);
    # the quantized result must be the same as for the same model held inline.
    entry = next(e for e in MODELS if e["name"] == "cnn_digits")
    src = SAMPLES / entry["path"]
    onnx.save(
        onnx.load(str(src)), str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.bin", size_threshold=0
    )
    calib = SAMPLES / entry["calib"]
    inline, _ = optimize(src, [*DEFAULT_PASSES, QUANT], calibration=calib)
    external, _ = optimize(tmp_path / "m.onnx", [*DEFAULT_PASSES, QUANT], calibration=calib)
    save_model(external, tmp_path / "q.onnx", source_dir=tmp_path)  # unchanged float tensors stay external
    x = {"input": eval_feeds(entry)[0]["input"]}
    got = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"]).run(None, x)[0]
    np.testing.assert_array_equal(got, _run(inline, x, optimize_graph=True))


@pytest.mark.parametrize(
    "kernel,strides,pads,dilations,shape",
    [
        ((3, 2), (2, 1), (1, 0, 1, 1), (1, 2), (2, 3, 7, 6)),
        ((3,), (2,), (1, 1), (1,), (2, 4, 9)),
        ((1, 1), (1, 1), (0, 0, 0, 0), (1, 1), (1, 5, 4, 4)),
    ],
)
def test_conv_patch_rows_are_what_the_conv_multiplies(kernel, strides, pads, dilations, shape):
    # Oracle: onnxruntime's Conv output equals W.reshape(M, -1) @ patch for every output position, so the rows
    # (and the Gram matrix built from them) use the weight's own column order.
    from onnxslim.calibration_stats import ConvPatches

    rng = np.random.default_rng(8)
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal((4, shape[1], *kernel)).astype(np.float32)
    m = _model(
        [
            helper.make_node(
                "Conv",
                ["x", "W"],
                ["y"],
                kernel_shape=list(kernel),
                strides=list(strides),
                pads=list(pads),
                dilations=list(dilations),
            )
        ],
        [_vi("x", list(shape))],
        [_vi("y", None)],
        [numpy_helper.from_array(w, "W")],
    )
    y = _run(m, {"x": x})  # [N, M, *out]
    spec = ConvPatches(kernel, strides, pads, dilations)
    rows = np.concatenate(list(spec.rows(x, chunk=10**9)))  # one piece: rows in (n, out positions) order
    assert rows.shape[1] == spec.columns(x, "x")
    expect = np.moveaxis(y, 1, -1).reshape(-1, 4)
    np.testing.assert_allclose(rows @ w.reshape(4, -1).T, expect, rtol=1e-4, atol=1e-4)
    pieces = list(spec.rows(x, chunk=7))  # a tiny chunk: the same rows, a few output rows at a time
    gram = sum(p.astype(np.float64).T @ p for p in pieces)
    np.testing.assert_allclose(gram, rows.astype(np.float64).T @ rows, rtol=1e-10)
    stats = collect_statistics(m, [{"x": x}], ["x"], grams={"x": spec}, histograms=False)
    np.testing.assert_allclose(stats["x"].gram, gram, rtol=1e-10)
    assert stats["x"].gram_rows == len(rows)


def test_conv_gptq_lowers_held_out_error_on_smooth_images():
    rng = np.random.default_rng(9)

    def smooth(n):  # neighbouring pixels and channels correlated, as in images
        base = rng.standard_normal((n, 1, 10, 10))
        k = np.ones((3, 3)) / 9
        out = np.stack([np.stack([np.convolve(r, k[0], "same") for r in img[0]]) for img in base])[:, None]
        return np.concatenate([out, 0.8 * out + 0.2 * rng.standard_normal(out.shape)], 1).astype(np.float32)

    w = rng.standard_normal((8, 2, 3, 3)).astype(np.float32)
    m = _model(
        [helper.make_node("Conv", ["x", "W"], ["y"], pads=[1, 1, 1, 1])],
        [_vi("x", [None, 2, 10, 10])],
        [_vi("y", None)],
        [numpy_helper.from_array(w, "W")],
    )
    calib = [{"x": smooth(2)} for _ in range(16)]
    held_out = {"x": smooth(8)}
    q = f"{QUANT}:min_macs_for_activation_quantization={10**9},bias_correction=false"  # weights only
    near, _ = optimize(m, [f"{q},weight_rounding=nearest"], calibration=calib)
    gptq, rep = optimize(m, [q], calibration=calib)
    assert rep.passes[0].stats["weights_gptq_rounded"] == 1
    ref = _run(m, held_out)
    e_near = float(np.mean((_run(near, held_out) - ref) ** 2))
    e_gptq = float(np.mean((_run(gptq, held_out) - ref) ** 2))
    assert e_gptq < 0.7 * e_near, (e_near, e_gptq)
