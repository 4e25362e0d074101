"""Weight sharing stacked under int8 (``share_weights`` then ``quantize_int8_static``): the quantizer makes each
codebook int8 per output channel and keeps the b-bit codes, so a shared layer runs as an integer kernel
(onnxruntime fuses it into QLinearConv) from a file holding b bits per weight; each output channel computes with
at most 2^b int8 values times its own scale, and the trained sample model keeps its accuracy."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from onnxslim.cli import main
from onnxslim.pipeline import optimize

from conftest import SAMPLES

CNN = SAMPLES / "cnn_digits"
MODEL, CALIB, EVAL = str(CNN / "model.onnx"), str(CNN / "calib"), str(CNN / "eval")


@pytest.fixture(scope="module")
def stacked():
    m, report = optimize(MODEL, ["share_weights", "quantize_int8_static"], calibration=CALIB, seed=0)
    return m, report


def _initializer_bytes(path) -> int:
    return sum(numpy_helper.to_array(t).nbytes for t in onnx.load(path).graph.initializer)


def _producer(m):
    return {o: n for n in m.graph.node for o in n.output}


def _ort_ops(m) -> collections.Counter:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        so.optimized_model_filepath = str(Path(d) / "opt.onnx")
        ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


def test_shared_layers_read_an_int8_codebook_through_dequantize_linear(stacked):
    m, _ = stacked
    prod = _producer(m)
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    stacked_layers = 0
    for n in m.graph.node:
        if n.op_type != "Conv":
            continue
        dq = prod[n.input[1]]
        assert dq.op_type == "DequantizeLinear"
        chain = prod.get(dq.input[0])
        if chain is None:
            continue  # a layer share_weights left (too small / first / last): a plain int8 weight
        # [Transpose] <- Reshape <- GatherElements(int8 codebook per output channel, Reshape(codes))
        while chain.op_type in ("Reshape", "Transpose"):
            chain = prod[chain.input[0]]
        assert chain.op_type == "GatherElements"
        codebook, out_channels = inits[chain.input[0]], inits[n.input[1]].shape[0] if n.input[1] in inits else None
        assert codebook.dtype == np.int8 and codebook.ndim == 2 and codebook.shape[1] <= 16
        assert chain.input[1] in prod  # the codes are decoded from packed words, not stored dense
        scale = inits[dq.input[1]]
        assert scale.shape == (codebook.shape[0],) and out_channels is None  # one scale per output channel
        stacked_layers += 1
    assert stacked_layers >= 4


def test_the_computed_weights_are_at_most_2_to_the_b_int8_values_times_a_scale(stacked):
    m, _ = stacked
    prod = _producer(m)
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    probe = onnx.ModelProto()
    probe.CopyFrom(m)
    wanted = []
    for n in m.graph.node:
        if n.op_type == "Conv" and prod[n.input[1]].input[0] in prod:
            wanted.append((n.input[1], inits[prod[n.input[1]].input[1]]))
            probe.graph.output.append(helper.make_tensor_value_info(n.input[1], onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = np.load(sorted(CNN.joinpath("calib").glob("*.npz"))[0])
    feed = {i.name: x[i.name] for i in sess.get_inputs()}
    values = sess.run([w for w, _ in wanted], feed)
    for (name, scale), w in zip(wanted, values):
        assert np.unique(w).size <= 16 * w.shape[0], name
        for row, s in zip(w, scale):  # Conv: output channels on axis 0
            assert np.unique(row).size <= 16, name
            q = row / s
            np.testing.assert_allclose(q, np.round(q), atol=1e-4)  # exactly int8 codes x the channel's scale
            assert np.abs(np.round(q)).max() <= 127


def test_onnxruntime_runs_the_shared_layers_as_integer_kernels(stacked):
    m, _ = stacked
    convs = sum(n.op_type == "Conv" for n in m.graph.node)
    assert _ort_ops(m)["QLinearConv"] == convs


def test_cli_stacks_keeps_accuracy_and_beats_int8_alone_on_size(tmp_path):
    out, int8 = tmp_path / "stacked.onnx", tmp_path / "int8.onnx"
    rc = main(
        ["optimize", MODEL, "-o", str(out), "--share", "4", "--quantize", "int8", "--calib", CALIB]
        + ["--check-data", EVAL, "-q", "--no-latency"]
    )
    assert rc == 0  # the parity gate (accuracy against the labels, within its floor) passed
    assert main(["optimize", MODEL, "-o", str(int8), "--quantize", "int8", "--calib", CALIB, "-q", "--no-latency"]) == 0
    # weight bytes (the graph's own bytes dominate this tiny file; real models: bench/RESULTS.md)
    assert _initializer_bytes(out) < 0.8 * _initializer_bytes(int8)
    ops = collections.Counter(n.op_type for n in onnx.load(out).graph.node)
    assert ops["GatherElements"] >= 4 and ops["DequantizeLinear"] > 0


def test_per_channel_codebooks_are_written_dense_and_quantized_as_plain_weights(tmp_path):
    out = tmp_path / "pc.onnx"
    rc = main(
        ["optimize", MODEL, "-o", str(out), "--share", "4", "--share-option", "per_channel=true"]
        + ["--quantize", "int8", "--calib", CALIB, "-q", "--no-latency"]
    )
    assert rc == 0
    m = onnx.load(out)
    ops = collections.Counter(n.op_type for n in m.graph.node)
    assert ops["GatherElements"] == 0 and ops["Gather"] == 0
    assert _ort_ops(m)["QLinearConv"] == ops["Conv"]


def test_channel_scaled_codebooks_stack_as_int8_tables_and_keep_accuracy():
    """One codebook times one scale per channel: under int8 each channel's table is its scale times the codebook,
    on its own int8 scale (the Mul folds away), the codes stay b-bit, and the layers run as integer kernels."""
    passes = [("share_weights", {"channel_scales": True}), "quantize_int8_static"]
    shared, _ = optimize(MODEL, passes[:1], calibration=CALIB, seed=0)
    m, report = optimize(MODEL, passes, calibration=CALIB, seed=0)
    (q,) = [p for p in report.passes if p.name == "quantize_int8_static"]
    layers = sum(n.op_type == "Mul" and n.input[1].endswith("_scales") for n in shared.graph.node)
    assert layers >= 4 and q.stats["codebook_weights_quantized"] == layers
    ops = collections.Counter(n.op_type for n in m.graph.node)
    assert not any(n.op_type == "Mul" and n.input[1].endswith("_scales") for n in m.graph.node)
    assert ops["GatherElements"] == layers
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    books = [inits[n.input[0]] for n in m.graph.node if n.op_type == "GatherElements"]
    assert all(b.dtype == np.int8 and b.ndim == 2 and b.shape[1] <= 16 for b in books)
    assert _ort_ops(m)["QLinearConv"] == ops["Conv"]
    # the int8 model keeps the float shared model's decisions on the held-out digits
    feeds = []
    for f in sorted(CNN.joinpath("eval").glob("*.npz")):
        with np.load(f) as z:
            feeds.append({k: z[k] for k in z.files if not k.startswith("__")})
    run = lambda model, f: ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, f
    )[0]
    agree = np.concatenate([run(shared, f).argmax(-1) == run(m, f).argmax(-1) for f in feeds])
    assert agree.mean() >= 0.98, agree.mean()


def test_below_opset_13_shared_layers_stay_float_and_the_model_loads():
    """Stacking needs DequantizeLinear's per-channel axis (opset 13): at opset 11 the shared layers stay float
    under int8, the report says why, and the model loads."""
    from _fusion_testlib import model

    r = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["b"]),
        helper.make_node("Conv", ["b", "W2"], ["y"], pads=[1, 1, 1, 1]),
    ]
    inits = [numpy_helper.from_array((r.standard_normal(s) * 0.3).astype(np.float32), n)
             for n, s in (("W1", (16, 8, 3, 3)), ("W2", (16, 16, 3, 3)))]  # fmt: skip
    vi = lambda n, s: helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, s)
    m = model(nodes, [vi("x", [1, 8, 10, 10])], [vi("y", [1, 16, 10, 10])], inits, opset=11)
    calib = [{"x": r.standard_normal((1, 8, 10, 10)).astype(np.float32)} for _ in range(4)]
    share = ("share_weights", {"min_weights": 0, "keep_first_last": False})
    out, report = optimize(m, [share, ("quantize_int8_static", {"allow_nothing": True})], calibration=calib, seed=0)
    (s,) = [p for p in report.passes if p.name == "share_weights"]
    (q,) = [p for p in report.passes if p.name == "quantize_int8_static"]
    assert s.stats["layers_shared"] == 2 and q.stats.get("codebook_weights_quantized", 0) == 0
    assert any("needs opset >= 13" in x["reason"] for x in q.skipped)
    ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])


def _logits(m, feeds):
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([s.run(None, f)[0] for f in feeds])


def test_tables_rounded_by_the_layer_gram_lower_the_output_error_on_a_trained_model():
    """A table entry's rounding moves every weight holding that code the same way; rounding each channel's K
    entries by GPTQ on its ``A^T H A`` (the default with calibration data) keeps the held-out logits closer to
    the float shared model's than rounding them to nearest does (cnn_digits: 0.0060 vs 0.0188 mean sq. error)."""
    feeds = []
    for f in sorted(CNN.joinpath("eval").glob("*.npz")):
        with np.load(f) as z:
            feeds.append({k: z[k] for k in z.files if not k.startswith("__")})
    shared, _ = optimize(MODEL, ["share_weights"], calibration=CALIB, seed=0)
    ref = _logits(shared, feeds)
    errors = {}
    for rounding in ("nearest", "gptq"):
        passes = ["share_weights", ("quantize_int8_static", {"weight_rounding": rounding})]
        m, report = optimize(MODEL, passes, calibration=CALIB, seed=0)
        (q,) = [p for p in report.passes if p.name == "quantize_int8_static"]
        assert q.stats["codebook_weights_quantized"] >= 4
        assert q.stats.get("codebook_tables_gptq_rounded", 0) == (
            q.stats["codebook_weights_quantized"] if rounding == "gptq" else 0
        )
        errors[rounding] = float(((_logits(m, feeds) - ref) ** 2).mean())
    assert errors["gptq"] < 0.6 * errors["nearest"], errors


def test_bias_correction_cancels_the_mean_shift_of_the_int8_tables():
    """With inputs of non-zero mean, the tables' rounding shifts each output channel's mean by ``(W_q - W) E[x]``;
    the stacked layer's bias absorbs it (the mean error per channel falls), as for plain int8 weights."""
    from _fusion_testlib import model

    r = np.random.default_rng(1)
    w = (r.standard_normal((64, 32)) * 0.2).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "B"], ["y"])]
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.zeros(32, np.float32), "B")]
    vi = lambda n, s: helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, s)
    m = model(nodes, [vi("x", [16, 64])], [vi("y", [16, 32])], inits, opset=13)
    feeds = [{"x": (2.0 + r.standard_normal((16, 64))).astype(np.float32)} for _ in range(8)]
    share = ("share_weights", {"bits": 3, "min_weights": 0, "keep_first_last": False})
    shared, _ = optimize(m, [share], calibration=feeds, seed=0)
    ref = _logits(shared, feeds)
    shift = {}
    for on in (False, True):
        opts = {"bias_correction": on, "weight_rounding": "nearest", "quantize_layer_outputs": False}
        out, report = optimize(m, [share, ("quantize_int8_static", opts)], calibration=feeds, seed=0)
        (q,) = [p for p in report.passes if p.name == "quantize_int8_static"]
        assert q.stats["codebook_weights_quantized"] == 1
        assert q.stats.get("biases_corrected", 0) == int(on)
        shift[on] = float(np.abs((_logits(out, feeds) - ref).mean(axis=0)).mean())
    assert shift[True] < 0.5 * shift[False], shift
