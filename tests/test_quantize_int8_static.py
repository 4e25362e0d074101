from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim.cli import main as cli_main
from onnxslim.errors import UsageError
from onnxslim.graph import check_model, iter_graphs
from onnxslim.passes.quantize.quantize_int8_static import QuantizeInt8Static
from onnxslim.pipeline import DEFAULT_PASSES, optimize

from _graphs import stored_weight
from conftest import MODELS, SAMPLES, accuracy, eval_feeds

QUANT = "quantize_int8_static"
DISTILL = "distill_layers"
# The tiny test layers are below the default min_macs_for_activation_quantization (they would get weights only).
FULL = f"{QUANT}:min_macs_for_activation_quantization=0"


# ------------------------------------------------------------------------------------------ helpers
def _model(nodes, inputs, outputs, inits=(), opset=17) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8 if opset >= 13 else 7
    inferred = onnx.shape_inference.infer_shapes(m)
    for o, io in zip(m.graph.output, inferred.graph.output):
        o.CopyFrom(io)
    check_model(m, full=True)
    return m


def _vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def _session(m: onnx.ModelProto, optimize_graph: bool = False) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize_graph else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _run(m, feed, optimize_graph=False):
    return _session(m, optimize_graph).run(None, feed)


def _ops(m: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for g in iter_graphs(m.graph) for n in g.node)


def _inits(g: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    out = {t.name: t for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = a.t
    return out


def _all_inits(m: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    out: dict[str, onnx.TensorProto] = {}
    for g in iter_graphs(m.graph):
        out.update(_inits(g))
    return out


def _fq_act(x, lo, hi):
    """Reference fake-quant of an activation, uint8 affine, range widened to include 0."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    s = np.float32((hi - lo) / 255)
    zp = np.clip(np.round(-lo / s), 0, 255)
    return ((np.clip(np.round(x / s) + zp, 0, 255) - zp) * s).astype(np.float32), s


def _fq_weight(w, axis):
    red = tuple(i for i in range(w.ndim) if i != axis)
    s = (np.abs(w).max(axis=red, keepdims=True) / 127).astype(np.float32)
    return (np.clip(np.round(w / s), -127, 127) * s).astype(np.float32), s.reshape(-1)


def _calib(shape, n=8, seed=0, name="x"):
    r = np.random.default_rng(seed)
    return [{name: r.standard_normal(shape).astype(np.float32)} for _ in range(n)]


# ------------------------------------------------------------------------------------------ tiny graphs
def test_conv_matches_numpy_fake_quant_reference():
    r = np.random.default_rng(1)
    w = r.standard_normal((4, 3, 3, 3)).astype(np.float32)
    b = r.standard_normal(4).astype(np.float32)
    m = _model(
        [helper.make_node("Conv", ["x", "W", "B"], ["y"], pads=[1, 1, 1, 1])],
        [_vi("x", [1, 3, 6, 6])],
        [_vi("y", None)],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    calib = _calib((1, 3, 6, 6))
    out, rep = optimize(
        m,
        [f"{FULL},target=x86-vnni,bias_correction=false,weight_rounding=nearest,range_method=minmax"],
        calibration=calib,
    )
    check_model(out, full=True)
    rec = rep.passes[0]
    assert rec.modified and rec.stats["weights_quantized"] == 1 and rec.stats["activations_quantized"] == 1
    assert rec.stats["biases_quantized"] == 1 and rec.stats["bytes_saved"] > 0
    inits = _all_inits(out)
    assert "W" not in inits  # the float weight is gone
    assert {t.data_type for t in inits.values() if list(t.dims) == [4, 3, 3, 3]} == {TensorProto.INT8}
    assert any(t.data_type == TensorProto.INT32 for t in inits.values())  # int32 bias
    dq_axes = [a.i for n in out.graph.node if n.op_type == "DequantizeLinear" for a in n.attribute if a.name == "axis"]
    assert dq_axes == [0, 0]  # per output channel: weight and bias

    allx = np.concatenate([c["x"].ravel() for c in calib])
    x = np.random.default_rng(7).standard_normal((1, 3, 6, 6)).astype(np.float32) * 1.5  # some values saturate
    xq, sx = _fq_act(x, float(allx.min()), float(allx.max()))
    wq, sw = _fq_weight(w, 0)
    bq = (np.round(b / (sx * sw)) * (sx * sw)).astype(np.float32)
    ref_model = _model(
        list(m.graph.node),
        list(m.graph.input),
        list(m.graph.output),
        [numpy_helper.from_array(wq, "W"), numpy_helper.from_array(bq, "B")],
    )
    ref = _run(ref_model, {"x": xq})[0]
    got = _run(out, {"x": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    fused = _run(out, {"x": x}, optimize_graph=True)[0]  # QLinearConv in onnxruntime: same up to rounding
    np.testing.assert_allclose(
        fused, ref, atol=4 * float(sx) * float(np.abs(wq).sum(axis=(1, 2, 3)).max()) / 127 + 1e-3
    )


@pytest.mark.parametrize("op", ["MatMul", "Gemm"])
def test_matmul_and_gemm_match_numpy_fake_quant_reference(op):
    r = np.random.default_rng(2)
    w = r.standard_normal((5, 6)).astype(np.float32)
    if op == "Gemm":  # transB=1: weight [N, K], channel axis 0
        node = helper.make_node("Gemm", ["x", "W", "B"], ["y"], transB=1)
        wt, axis = w.T.copy(), 0
        inits = [
            numpy_helper.from_array(wt, "W"),
            numpy_helper.from_array(r.standard_normal(6).astype(np.float32), "B"),
        ]
    else:
        node = helper.make_node("MatMul", ["x", "W"], ["y"])
        wt, axis = w, 1
        inits = [numpy_helper.from_array(wt, "W")]
    m = _model([node], [_vi("x", [3, 5])], [_vi("y", None)], inits)
    calib = _calib((3, 5), seed=3)
    out, rep = optimize(
        m,
        [f"{FULL},target=x86-vnni,bias_correction=false,weight_rounding=nearest,range_method=minmax"],
        calibration=calib,
    )
    check_model(out, full=True)
    axes = [a.i for n in out.graph.node if n.op_type == "DequantizeLinear" for a in n.attribute if a.name == "axis"]
    assert axes[0] == axis
    allx = np.concatenate([c["x"].ravel() for c in calib])
    x = np.random.default_rng(8).standard_normal((3, 5)).astype(np.float32)
    xq, sx = _fq_act(x, float(allx.min()), float(allx.max()))
    wq, sw = _fq_weight(wt, axis)
    ref_inits = [numpy_helper.from_array(wq, "W")]
    if op == "Gemm":
        b = numpy_helper.to_array(inits[1])
        ref_inits.append(numpy_helper.from_array((np.round(b / (sx * sw)) * (sx * sw)).astype(np.float32), "B"))
    ref = _run(_model([node], list(m.graph.input), list(m.graph.output), ref_inits), {"x": xq})[0]
    np.testing.assert_allclose(_run(out, {"x": x})[0], ref, rtol=1e-5, atol=1e-5)


def test_opset12_uses_per_tensor_weights_and_loads():
    r = np.random.default_rng(4)
    w = (r.standard_normal((4, 3)) * np.array([1.0, 0.01, 5.0])).astype(np.float32)  # columns of unequal size
    m = _model(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        [_vi("x", [2, 4])],
        [_vi("y", None)],
        [numpy_helper.from_array(w, "W")],
        opset=12,
    )
    # target=x86-vnni: the numpy references assume full 8-bit weights
    out, _ = optimize(m, [f"{FULL},target=x86-vnni"], calibration=_calib((2, 4)))  # DequantizeLinear weights
    check_model(out, full=True)
    dq = [n for n in out.graph.node if n.op_type == "DequantizeLinear"]
    assert dq and not any(a.name == "axis" for n in dq for a in n.attribute)
    _run(out, {"x": np.ones((2, 4), np.float32)})
    # Weights only (12 MACs, below the default threshold): Cast + Mul, which broadcasts a per-channel scale at
    # any opset, so the tiny column keeps its precision.
    out, _ = optimize(m, [f"{QUANT}:weight_rounding=nearest,target=x86-vnni"], calibration=_calib((2, 4)))
    check_model(out, full=True)
    kind, q = stored_weight(out, out.graph.node[-1].input[1])
    assert kind == "cast_mul" and q.data_type == TensorProto.INT8
    x = np.ones((2, 4), np.float32)
    np.testing.assert_allclose(_run(out, {"x": x})[0], x @ _fq_weight(w, 1)[0], rtol=1e-6, atol=1e-7)


def test_branch_not_reached_by_calibration_keeps_float_activation_but_int8_weight():
    r = np.random.default_rng(5)

    def branch(tag):
        w = helper.make_node(
            "Constant",
            [],
            [f"W_{tag}"],
            value=numpy_helper.from_array(r.standard_normal((4, 3)).astype(np.float32), f"Wv_{tag}"),
        )
        act = helper.make_node("Relu", ["x"], [f"h_{tag}"])  # a branch-local activation
        mm = helper.make_node("MatMul", [f"h_{tag}", f"W_{tag}"], [f"y_{tag}"])
        return helper.make_graph([w, act, mm], tag, [], [_vi(f"y_{tag}", [2, 3])])

    m = _model(
        [helper.make_node("If", ["c"], ["y"], then_branch=branch("then"), else_branch=branch("else"))],
        [_vi("c", [], TensorProto.BOOL), _vi("x", [2, 4])],
        [_vi("y", [2, 3])],
    )
    calib = [{"c": np.array(True), "x": f["x"]} for f in _calib((2, 4))]  # the else branch never runs
    out, rep = optimize(m, [FULL], calibration=calib)
    check_model(out, full=True)
    rec = rep.passes[0]
    assert rec.stats["weights_quantized"] == 2 and rec.stats["activations_quantized"] == 1
    assert any("no calibration statistics" in s["reason"] for s in rec.skipped)
    for c in (True, False):
        _run(out, {"c": np.array(c), "x": np.ones((2, 4), np.float32)})


def test_excluded_nodes_stay_float_with_reason():
    r = np.random.default_rng(6)
    m = _model(
        [
            helper.make_node("MatMul", ["x", "W1"], ["h"], name="first"),
            helper.make_node("MatMul", ["h", "W2"], ["y"], name="second"),
        ],
        [_vi("x", [2, 4])],
        [_vi("y", None)],
        [
            numpy_helper.from_array(r.standard_normal((4, 4)).astype(np.float32), "W1"),
            numpy_helper.from_array(r.standard_normal((4, 2)).astype(np.float32), "W2"),
        ],
    )
    out, rep = optimize(m, ["quantize_int8_static:exclude_nodes=second"], calibration=_calib((2, 4)))
    assert "W2" in _all_inits(out) and "W1" not in _all_inits(out)
    assert any(s["node"] == "second" and "exclude" in s["reason"] for s in rep.passes[0].skipped)


def test_nothing_to_quantize_is_an_error_unless_allowed_and_second_run_says_already_quantized():
    m = _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", [2])], [_vi("y", None)])
    with pytest.raises(UsageError, match="nothing to quantize.*allow_nothing"):
        optimize(m, [QUANT], calibration=_calib((2,)))
    out, rep = optimize(m, ["quantize_int8_static:allow_nothing=true"], calibration=_calib((2,)))
    assert out.SerializeToString() == m.SerializeToString() and not rep.passes[0].modified
    r = np.random.default_rng(7)
    mm = _model(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        [_vi("x", [2, 4])],
        [_vi("y", None)],
        [numpy_helper.from_array(r.standard_normal((4, 3)).astype(np.float32), "W")],
    )
    once, _ = optimize(mm, [QUANT], calibration=_calib((2, 4)))
    with pytest.raises(UsageError, match="already quantized"):
        optimize(once, [QUANT], calibration=_calib((2, 4)))


def test_needs_calibration():
    m = _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", [2])], [_vi("y", None)])
    with pytest.raises(UsageError, match="calibration"):
        optimize(m, [QUANT])


# ------------------------------------------------------------------------------------------ sample models
def _eval_accuracy(entry: dict, path: Path) -> float:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    feeds = eval_feeds(entry)
    outs = [dict(zip(names, sess.run(None, {k: v for k, v in f.items() if not k.startswith("__")}))) for f in feeds]
    return accuracy(entry, outs, feeds)


QUANTIZABLE = [m for m in MODELS if not m["name"].startswith("sklearn")]
# Measured (range_method auto = minmax): the largest drop is gru_digits, 0.9756 -> 0.9733.
ACCURACY_TOLERANCE = 0.01


@pytest.mark.parametrize("entry", QUANTIZABLE, ids=[m["name"] for m in QUANTIZABLE])
def test_sample_model_quantizes_loads_and_keeps_accuracy(entry, tmp_path):
    src = SAMPLES / entry["path"]
    dst = tmp_path / "int8.onnx"
    _, rep = optimize(
        src, [*DEFAULT_PASSES, QUANT], output=dst, calibration=SAMPLES / entry["calib"], on_pass_error="raise"
    )
    rec = next(p for p in rep.passes if p.name == QUANT)
    assert rec.modified and rec.stats["weights_quantized"] > 0
    # gru_digits (LSTM + a 640-MAC head) and wine_ifloop (13x16 layers) are all below the default
    # min_macs_for_activation_quantization: weights only, no activation Q/DQ.
    small = entry["name"] in ("gru_digits", "wine_ifloop")
    assert (rec.stats.get("activations_quantized", 0) > 0) != small, rec.stats
    assert (rec.stats.get("layers_weight_only_small", 0) > 0) or not small
    assert rec.stats["bytes_saved"] > 0
    acc = _eval_accuracy(entry, dst)
    assert acc >= entry["float_metric"] - ACCURACY_TOLERANCE, (entry["name"], acc, entry["float_metric"])
    out = onnx.load(str(dst))
    int8 = [t for t in _all_inits(out).values() if t.data_type == TensorProto.INT8]
    assert int8
    has_axis = any(
        a.name == "axis"
        for g in iter_graphs(out.graph)
        for n in g.node
        if n.op_type == "DequantizeLinear"
        for a in n.attribute
    )
    assert has_axis == (entry["opset"] >= 13)  # per-channel only where DequantizeLinear has 'axis'
    if entry["name"] in ("cnn_digits", "transformer_text", "gru_digits"):
        ratio = src.stat().st_size / dst.stat().st_size
        # Measured: 2.45 / 2.56 / 3.41 (weights ~4x; the rest is node and name overhead of tiny models).
        assert ratio > 2.2, (entry["name"], ratio)


@pytest.mark.parametrize("entry", [m for m in MODELS if m["name"].startswith("sklearn")], ids=lambda m: m["name"])
def test_sklearn_models_have_nothing_to_quantize(entry, tmp_path):
    src = SAMPLES / entry["path"]
    with pytest.raises(UsageError, match="nothing to quantize.*ai.onnx.ml"):
        optimize(src, [QUANT], calibration=SAMPLES / entry["calib"])
    out, rep = optimize(src, ["quantize_int8_static:allow_nothing=true"], calibration=SAMPLES / entry["calib"])
    assert out.SerializeToString() == onnx.load(str(src)).SerializeToString()
    assert any("ai.onnx.ml" in s["reason"] for s in rep.passes[0].skipped)


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("lossless_first", [False, True])
def test_wine_ifloop_branch_gemm_gets_int8_weight_inside_the_branch(lossless_first, full):
    # Alone, each branch holds its weight in a Constant node and gets its own int8 copy. After the lossless
    # passes both branches share one weight (outer scope); fully quantized, its int8 copy is stored once, in the
    # main graph. Weight-only (the default here: 13x16 = 208 MACs) the int8 weight is decoded by Cast + Mul in the
    # main graph (onnxruntime folds that into a float initializer at load) and the branch reads the result.
    entry = next(m for m in MODELS if m["name"] == "wine_ifloop")
    q = FULL if full else QUANT
    passes = [*DEFAULT_PASSES, q] if lossless_first else [q]
    out, _ = optimize(SAMPLES / entry["path"], passes, calibration=SAMPLES / entry["calib"])
    check_model(out, full=True)
    if_node = next(n for n in out.graph.node if n.op_type == "If")
    for attr in if_node.attribute:
        g = attr.g
        inits = {**_inits(out.graph), **_inits(g)} if lossless_first and full else _inits(g)
        producers = {o: n for n in g.node for o in n.output}
        mm = next(n for n in g.node if n.op_type in ("MatMul", "Gemm"))
        if full:
            dq = producers[mm.input[1]]
            assert dq.op_type == "DequantizeLinear" and inits[dq.input[0]].data_type == TensorProto.INT8, attr.name
        else:
            assert mm.input[1] not in producers  # outer scope
            kind, q = stored_weight(out, mm.input[1])
            assert kind == "cast_mul" and q.data_type == TensorProto.INT8, attr.name
        # fully quantized: the activation is quantized too; weight-only: it stays float
        assert (producers[mm.input[0]].op_type == "DequantizeLinear") == full
    feeds = eval_feeds(entry)
    for opt in (False, True):
        sess = _session(out, optimize_graph=opt)
        for f in feeds:  # both branches run (eval files take each)
            sess.run(None, {"input": f["input"]})


def test_cli_quantize_int8_with_parity_gate(tmp_path, capsys):
    src = SAMPLES / "cnn_digits" / "model.onnx"
    dst = tmp_path / "q.onnx"
    rc = cli_main(
        [
            "optimize",
            str(src),
            "-o",
            str(dst),
            "--quantize",
            "int8",
            "--calib",
            str(SAMPLES / "cnn_digits" / "calib"),
            "--check-data",
            str(SAMPLES / "cnn_digits" / "eval"),
        ]
    )
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "quantize_int8_static" in text and "parity (lossy): pass" in text
    assert dst.stat().st_size < src.stat().st_size / 2
    rc = cli_main(["optimize", str(src), "-o", str(tmp_path / "x.onnx"), "--quantize", "int8"])
    assert rc == 2 and "--calib" in capsys.readouterr().err
    assert cli_main(["passes"]) == 0 and "quantize_int8_static" in capsys.readouterr().out


def test_cli_quantize_respects_given_passes():
    from onnxslim.cli import Optimize, build_parser

    def names(*argv):
        args = build_parser().parse_args(["optimize", "in.onnx", "-o", "out.onnx", *argv])
        return [p.name for p in Optimize.settings(args).passes]

    # with --calib, int8 is followed by its recovery (distill_layers) unless --no-distill
    assert names("--quantize", "int8", "--calib", "d") == [*DEFAULT_PASSES, QUANT, DISTILL]
    assert names("--quantize", "int8", "--calib", "d", "--no-distill") == [*DEFAULT_PASSES, QUANT]
    assert names("-p", "fold_constants", "--quantize", "int8", "--calib", "d") == ["fold_constants", QUANT, DISTILL]
    given = ("-p", "quantize_int8_static:activations=int8", "--quantize", "int8", "--calib", "d")
    assert names(*given) == [QUANT, DISTILL]
    # --quantize-option configures the pass and keeps the default lossless pipeline in front of it
    args = build_parser().parse_args(
        [
            "optimize",
            "in.onnx",
            "-o",
            "out.onnx",
            "--quantize",
            "int8",
            "--calib",
            "d",
            "--quantize-option",
            "weight_rounding=nearest",
            "--quantize-option",
            "bias_correction=false",
            "--target-cpu",
            "arm",
        ]
    )
    specs = Optimize.settings(args).passes
    assert [p.name for p in specs] == [*DEFAULT_PASSES, QUANT, DISTILL]
    assert specs[-2].options == {"weight_rounding": "nearest", "bias_correction": "false", "target": "arm"}
    with pytest.raises(UsageError, match="--quantize-option applies to int8"):
        Optimize.settings(
            build_parser().parse_args(
                ["optimize", "in.onnx", "-o", "o.onnx", "--quantize-option", "weight_rounding=nearest"]
            )
        )


@pytest.mark.parametrize("opset", [11, 13, 17])
def test_mixed_ops_load_and_run_in_onnxruntime(opset):
    """Conv (grouped too), ConvTranspose, pooling, Add/Concat/Resize pass-through, Gather table, LSTM: every
    output loads and runs with and without onnxruntime's graph optimizations, and stays close to float."""
    r = np.random.default_rng(9)

    def w(name, *shape, scale=0.3):
        return numpy_helper.from_array((r.standard_normal(shape) * scale).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "W2"], ["c2"], pads=[1, 1, 1, 1], group=2),
        helper.make_node("Add", ["c2", "r1"], ["a"]),
        helper.make_node("MaxPool", ["a"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("ConvTranspose", ["p", "WT"], ["u"], strides=[2, 2], kernel_shape=[2, 2]),
        helper.make_node("Concat", ["u", "c1"], ["cat"], axis=1),
        helper.make_node("GlobalAveragePool", ["cat"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gather", ["E", "ids"], ["emb"]),  # [2, 10] embedding rows
        helper.make_node("Concat", ["f", "emb"], ["feat"], axis=1),  # [2, 16]
        helper.make_node(
            "Unsqueeze", ["feat"] + ([] if opset < 13 else ["ax"]), ["seq"], **({"axes": [0]} if opset < 13 else {})
        ),
        helper.make_node("LSTM", ["seq", "LW", "LR"], ["", "h"], hidden_size=4),
        helper.make_node(
            "Squeeze", ["h"] + ([] if opset < 13 else ["ax"]), ["hs"], **({"axes": [0]} if opset < 13 else {})
        ),
        helper.make_node("Gemm", ["hs", "WH", "BH"], ["y"], transB=1),
    ]
    inits = [
        w("W1", 4, 2, 3, 3),
        numpy_helper.from_array(np.full(4, 0.1, np.float32), "B1"),
        w("W2", 4, 2, 3, 3),
        w("WT", 4, 2, 2, 2),
        w("E", 32, 10),
        w("LW", 1, 16, 16),
        w("LR", 1, 16, 4),
        w("WH", 3, 4),
        numpy_helper.from_array(np.zeros(3, np.float32), "BH"),
        numpy_helper.from_array(np.array([0], np.int64), "ax"),
    ]
    m = _model(
        nodes, [_vi("x", [2, 2, 6, 6]), _vi("ids", [2], TensorProto.INT64)], [_vi("y", None)], inits, opset=opset
    )
    calib = [
        {"x": f["x"], "ids": np.array([i % 32, (3 * i) % 32], np.int64)}
        for i, f in enumerate(_calib((2, 2, 6, 6), n=12, seed=10))
    ]
    out, rep = optimize(m, [QUANT], calibration=calib)
    check_model(out, full=True)
    rec = rep.passes[0]
    assert rec.stats["weights_quantized"] == 7  # W1, W2, WT, E, LW, LR, WH
    weights = {t.name for t in inits if len(t.dims) > 1}
    float_w = {n for n, t in _all_inits(out).items() if t.data_type == TensorProto.FLOAT and n in weights}
    assert not float_w, float_w  # only scales are float
    feed = {"x": calib[0]["x"], "ids": calib[0]["ids"]}
    ref = _run(m, feed)[0]
    for opt in (False, True):
        got = _run(out, feed, optimize_graph=opt)[0]
        cos = float((got * ref).sum() / np.linalg.norm(got) / np.linalg.norm(ref))
        assert cos > 0.99, (opt, cos)


def test_registered_lossy_pass_with_typed_options():
    from onnxslim.registry import get_pass

    cls = get_pass(QUANT)
    assert cls is QuantizeInt8Static and not cls.exact and cls.needs_calibration
    assert cls.metric_floors["accuracy_drop"] <= 0.01 and cls.metric_floors["cosine"] >= 0.99
    p = cls(activations="int8", weights_per_channel="false", exclude_op_types="Gather,LSTM")
    assert p.options.activations == "int8" and p.options.weights_per_channel is False
    assert p.options.exclude_op_types == ["Gather", "LSTM"]
    with pytest.raises(UsageError, match="activations"):
        cls(activations="int4")
    with pytest.raises(UsageError, match="percentile"):
        cls(percentile=20)


# ------------------------------------------------------------------------------------------ cost rules
def _pool_head_model() -> onnx.ModelProto:
    r = np.random.default_rng(11)
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "WH", "BH"], ["y"], transB=1),
    ]
    inits = [
        numpy_helper.from_array((r.standard_normal((16, 2, 3, 3)) * 0.3).astype(np.float32), "W"),
        numpy_helper.from_array(np.full(16, 0.1, np.float32), "B"),
        numpy_helper.from_array((r.standard_normal((4, 16)) * 0.3).astype(np.float32), "WH"),
        numpy_helper.from_array(np.zeros(4, np.float32), "BH"),
    ]
    return _model(nodes, [_vi("x", [2, 2, 8, 8])], [_vi("y", [2, 4])], inits)


def test_global_average_pool_output_is_quantized_and_fuses_in_onnxruntime(tmp_path):
    m = _pool_head_model()
    calib = _calib((2, 2, 8, 8), seed=12)
    out, rep = optimize(m, [FULL], calibration=calib)
    check_model(out, full=True)
    producers = {o: n for n in out.graph.node for o in n.output}
    pool = next(n for n in out.graph.node if n.op_type == "GlobalAveragePool")
    assert producers[pool.input[0]].op_type == "DequantizeLinear"
    flat = next(n for n in out.graph.node if n.op_type == "Flatten")
    dq = producers[flat.input[0]]  # the pool's output is Q/DQ'd before its consumer
    assert dq.op_type == "DequantizeLinear" and producers[dq.input[0]].op_type == "QuantizeLinear"
    assert producers[producers[dq.input[0]].input[0]] is pool
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "ort.onnx")
    ort.InferenceSession(out.SerializeToString(), so, providers=["CPUExecutionProvider"])
    fused = _ops(onnx.load(so.optimized_model_filepath))
    assert fused["QLinearGlobalAveragePool"] == 1 and fused["GlobalAveragePool"] == 0, fused
    x = _calib((2, 2, 8, 8), n=1, seed=13)[0]
    ref = _run(m, x)[0]
    for opt in (False, True):
        got = _run(out, x, optimize_graph=opt)[0]
        assert np.abs(got - ref).max() < 0.05 * (np.abs(ref).max() + 1e-6), (opt, got, ref)


def test_layers_below_min_macs_get_weights_only():
    # Conv: 16*2*3*3 = 288 weights x 64 output positions = 18432 MACs (int8); head Gemm: 4*16 = 64 MACs.
    m = _pool_head_model()
    calib = _calib((2, 2, 8, 8), seed=12)
    out, rep = optimize(m, [QUANT], calibration=calib)  # default threshold 1024
    check_model(out, full=True)
    rec = rep.passes[0]
    assert rec.stats["layers_weight_only_small"] == 1 and rec.stats["weights_quantized"] == 2
    producers = {o: n for n in out.graph.node for o in n.output}
    conv = next(n for n in out.graph.node if n.op_type == "Conv")
    gemm = next(n for n in out.graph.node if n.op_type == "Gemm")
    assert producers[conv.input[0]].op_type == "DequantizeLinear"  # big enough: activation quantized
    kind, q = stored_weight(out, gemm.input[1])
    assert kind == "cast_mul" and q.data_type == TensorProto.INT8  # int8 weight ...
    assert producers[gemm.input[0]].op_type == "Flatten"  # ... float activation, float bias
    assert _all_inits(out)[gemm.input[2]].data_type == TensorProto.FLOAT
    x = _calib((2, 2, 8, 8), n=1, seed=13)[0]
    ref = _run(m, x)[0]
    for opt in (False, True):
        got = _run(out, x, optimize_graph=opt)[0]
        assert np.abs(got - ref).max() < 0.05 * (np.abs(ref).max() + 1e-6), (opt, got, ref)
    # A threshold above the Conv's MACs leaves no activation quantized; 0 quantizes the Gemm fully.
    out_hi, rep_hi = optimize(m, [f"{QUANT}:min_macs_for_activation_quantization=20000"], calibration=calib)
    assert rep_hi.passes[0].stats["layers_weight_only_small"] == 2
    assert "activations_quantized" not in rep_hi.passes[0].stats
    out0, rep0 = optimize(m, [FULL], calibration=calib)
    assert "layers_weight_only_small" not in rep0.passes[0].stats
    p0 = {o: n for n in out0.graph.node for o in n.output}
    assert p0[next(n for n in out0.graph.node if n.op_type == "Gemm").input[0]].op_type == "DequantizeLinear"


def test_detector_output_mixing_box_pixels_and_scores_keeps_both_accurate():
    # One output holds box coordinates (0..320 px) next to class scores (0..1): one 8-bit scale for both would
    # leave the scores ~1.25 wide steps. The output stays float, and every layer still runs in int8.
    r = np.random.default_rng(21)

    def w(name, *shape):
        return numpy_helper.from_array((r.standard_normal(shape) * 0.3).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["f"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["f"], ["fr"]),
        helper.make_node("Conv", ["fr", "WB"], ["b"]),
        helper.make_node("Sigmoid", ["b"], ["bs"]),
        helper.make_node("Mul", ["bs", "px"], ["boxes"]),
        helper.make_node("Conv", ["fr", "WS"], ["s"]),
        helper.make_node("Sigmoid", ["s"], ["scores"]),
        helper.make_node("Concat", ["boxes", "scores"], ["y"], axis=1),
    ]
    m = _model(
        nodes,
        [_vi("x", [1, 3, 16, 16])],
        [_vi("y", None)],
        [
            w("W1", 8, 3, 3, 3),
            w("WB", 4, 8, 1, 1),
            w("WS", 5, 8, 1, 1),
            numpy_helper.from_array(np.array(320.0, np.float32), "px"),
        ],
    )
    calib = _calib((1, 3, 16, 16), n=16, seed=22)
    x = _calib((1, 3, 16, 16), n=1, seed=23)[0]
    ref = _run(m, x)[0]

    def errors(opts):
        # Full 8-bit weights, run as ONNX defines Q/DQ (ORT's optimizations off): the quantization's own
        # error, the same on every CPU (AVX2 int8 kernels saturate full-range weights; VNNI ones do not).
        # minmax ranges: the bound is on the max error, which mse ranges trade for a lower mean error.
        out, rep = optimize(m, [f"{FULL},target=x86-vnni,range_method=minmax{opts}"], calibration=calib)
        got = _run(out, x)[0]
        return np.abs(got[:, :4] - ref[:, :4]).max(), np.abs(got[:, 4:] - ref[:, 4:]).max(), rep

    box_err, score_err, rep = errors("")
    # x and the shared feature map fr (inputs), and the two head convs' outputs, which Sigmoid reads: onnxruntime
    # fuses all 3 convs into QLinearConv only with a Q after each (the first conv's Relu output fr serves it); the
    # Sigmoid outputs feed the decoding tail (Mul by the box size, Concat into the output) and stay float
    stats = rep.passes[0].stats
    assert stats["activations_quantized"] == 4 and stats["layer_outputs_quantized"] == 2, stats
    # < 1 % of each part's range (one 8-bit scale over 0..320 would allow score errors up to ~0.6)
    assert box_err < 3.2 and score_err < 0.01, (box_err, score_err)


def test_calibration_reports_progress_through_optimize():
    entry = next(m for m in MODELS if m["name"] == "cnn_digits")
    seen: list[tuple[str, int, int | None]] = []
    optimize(
        SAMPLES / entry["path"],
        [QUANT],
        calibration=SAMPLES / entry["calib"],
        progress=lambda stage, done, total: seen.append((stage, done, total)),
    )
    n = entry["n_calib"]
    assert [d for s, d, _ in seen if s == "calibration"] == list(range(1, n + 1))
    assert {t for s, _, t in seen if s == "calibration"} == {n}
    # the pass around it is a stage too (start 0/1, end 1/1), so logs without a terminal can say what runs
    assert ("pass quantize_int8_static", 0, 1) in seen and ("pass quantize_int8_static", 1, 1) in seen


def test_conv_outputs_read_by_float_ops_get_a_q_so_onnxruntime_fuses_qlinearconv(tmp_path):
    # Conv -> Sigmoid (SiLU-style heads): without a Q after the Conv, onnxruntime dequantizes the weight and
    # runs a float Conv (slower than fp32); with it, every Conv becomes QLinearConv.
    r = np.random.default_rng(3)
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["a"], ["sa"]),
        helper.make_node("Mul", ["a", "sa"], ["h"]),
        helper.make_node("Conv", ["h", "W2"], ["b"], pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["b"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array((r.standard_normal(s) * 0.3).astype(np.float32), n)
        for n, s in (("W1", (8, 3, 3, 3)), ("W2", (8, 8, 3, 3)))
    ]
    m = _model(nodes, [_vi("x", [1, 3, 16, 16])], [_vi("y", None)], inits)
    calib = _calib((1, 3, 16, 16), n=8, seed=4)

    def fused_ops(options: str) -> Counter:
        out, _ = optimize(m, [f"{FULL},target=x86-avx2{options}"], calibration=calib)
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
        ort.InferenceSession(out.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)

    with_q = fused_ops("")
    assert with_q["QLinearConv"] == 2 and with_q["Conv"] == 0 and with_q["FusedConv"] == 0, with_q
    assert with_q["QLinearSigmoid"] >= 1 and with_q["QLinearMul"] == 1, with_q  # SiLU in int8 too
    # the mechanism is what makes them fuse: without the output Q (and without Sigmoid's Q/DQ, which would
    # quantize the conv output as its input), the convs stay float
    without = fused_ops(",quantize_layer_outputs=false,exclude_op_types=Sigmoid")
    assert without["QLinearConv"] < 2, without
    x = calib[0]
    out, _ = optimize(m, [f"{FULL},target=x86-avx2"], calibration=calib)
    got, ref = _run(out, x, optimize_graph=True)[0].ravel(), _run(m, x)[0].ravel()
    cos = float(got @ ref / (np.linalg.norm(got) * np.linalg.norm(ref)))
    assert cos > 0.999, cos


def test_opset_raised_on_request_gives_per_channel_weights(tmp_path, capsys):
    r = np.random.default_rng(8)
    w = (r.standard_normal((4, 3)) * np.array([1.0, 0.01, 5.0])).astype(np.float32)
    m = _model(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        [_vi("x", [2, 4])],
        [_vi("y", None)],
        [numpy_helper.from_array(w, "W")],
        opset=11,
    )
    out, rep = optimize(m, [f"{FULL},target=x86-vnni"], calibration=_calib((2, 4)), opset=13)
    check_model(out, full=True)
    assert [o.version for o in out.opset_import if o.domain in ("", "ai.onnx")] == [13]
    dq = [n for n in out.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("_int8")]
    assert dq and all(any(a.name == "axis" for a in n.attribute) for n in dq)  # per-channel scales
    assert any("opset raised 11 -> 13" in w for w in rep.warnings)
    x = np.ones((2, 4), np.float32)
    np.testing.assert_allclose(_run(out, {"x": x})[0], x @ w, rtol=0.02, atol=0.02)
    # never lowered; a bad value is a usage error (exit 2 from the CLI)
    with pytest.raises(UsageError, match="below the model's opset 11"):
        optimize(m, [FULL], calibration=_calib((2, 4)), opset=10)
    src = tmp_path / "m.onnx"
    onnx.save(m, src)
    assert cli_main(["optimize", str(src), "-o", str(tmp_path / "o.onnx"), "--opset", "9"]) == 2
    assert "below the model's opset 11" in capsys.readouterr().err
    assert not (tmp_path / "o.onnx").exists()
