"""prune_channels: structured channel removal on tiny graphs, checked against numpy forwards of the ORIGINAL weights
sliced to the kept channels (so a wrong slice, axis or offset anywhere shows as an output mismatch)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from onnx import helper, numpy_helper

from onnxslim.errors import UsageError
from onnxslim.graph import check_model
from onnxslim.passes.prune.prune_channels import PruneChannels
from onnxslim.pipeline import optimize
from onnxslim.testing import check_pass_contract

from _fusion_testlib import init, model

EPS = 1e-5


# ------------------------------------------------------------------------------------------------- helpers
def _rng(seed=0):
    return np.random.default_rng(seed)


def _w(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _prune(m, calibration=None, **opts):
    opts.setdefault("keep_first_last", False)
    opts.setdefault("channel_multiple", 1)  # tiny graphs: exact fractions (the default rounds to SIMD widths)
    out, rep = optimize(m, [PruneChannels(**opts)], calibration=calibration)
    check_model(out, full=True)
    return out, rep.passes[0]


def _run(m: onnx.ModelProto, feed: dict) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feed)[0]


def _inits(m) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


def _node(m, name):
    return next(n for n in m.graph.node if n.name == name)


def _weight(m, node_name, i=1) -> np.ndarray:
    return _inits(m)[_node(m, node_name).input[i]]


def _conv(x, w, b=None, pad=0, group=1):
    x, w = x.astype(np.float64), w.astype(np.float64)
    m, cg, kh, kw = w.shape
    win = sliding_window_view(np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad))), (kh, kw), axis=(2, 3))
    mg = m // group
    y = np.concatenate(
        [np.einsum("nchwij,mcij->nmhw", win[:, g * cg : (g + 1) * cg], w[g * mg : (g + 1) * mg]) for g in range(group)],
        axis=1,
    )
    return y if b is None else y + b.reshape(1, -1, 1, 1)


def _bn(x, g, b, mean, var):
    s = (g / np.sqrt(var + EPS)).reshape(1, -1, 1, 1)
    return (x - mean.reshape(1, -1, 1, 1)) * s + b.reshape(1, -1, 1, 1)


def _relu(x):
    return np.maximum(x, 0)


def _l2(w, axis=0):
    return np.sqrt((np.moveaxis(w.astype(np.float64), axis, 0).reshape(w.shape[axis], -1) ** 2).sum(axis=1))


def _kept(scores, n_remove):
    """The channels kept when the n_remove lowest scores go (ties by index, as the pass)."""
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    return np.array(sorted(order[n_remove:]))


def _x(shape, seed=1):
    return {"x": _rng(seed).standard_normal(shape).astype(np.float32)}


def _close(out, feed, ref):
    got = _run(out, feed)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------- topologies
def _conv_bn_relu_conv(dead=()):
    r = _rng(0)
    p = {
        "W1": _w(r, 8, 3, 3, 3),
        "B1": _w(r, 8),
        "g": (r.random(8) + 0.5).astype(np.float32),
        "b": _w(r, 8),
        "m": _w(r, 8),
        "v": (r.random(8) + 0.5).astype(np.float32),
        "W2": _w(r, 4, 8, 3, 3),
        "B2": _w(r, 4),
    }
    p["W1"][list(dead)] *= 1e-3
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "g", "b", "m", "v"], ["bn"], name="bn", epsilon=EPS),
        helper.make_node("Relu", ["bn"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "W2", "B2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    return model(nodes, [("x", [1, 3, 6, 6])], [("y", None)], [init(k, v) for k, v in p.items()]), p


def test_conv_bn_relu_conv_removes_the_weakest_channels_and_matches_the_sliced_network():
    m, p = _conv_bn_relu_conv()
    out, rec = _prune(m, fraction=0.25, criterion="l2")
    assert rec.modified and rec.stats["groups_pruned"] == 1 and rec.stats["channels_removed"] == 2
    # conv1: 36 positions x 8 x 27, conv2: 36 x 4 x 72; two of conv1's 8 channels go
    assert rec.stats["macs_before"] == 36 * 8 * 27 + 36 * 4 * 72
    assert rec.stats["macs_after"] == 36 * 6 * 27 + 36 * 4 * 54
    # importance: the conv rows' norms scaled by the BatchNormalization that follows
    kept = _kept(_l2(p["W1"]) * p["g"] / np.sqrt(p["v"] + EPS), 2)
    assert _weight(out, "conv1").shape == (6, 3, 3, 3) and _weight(out, "conv2").shape == (4, 6, 3, 3)
    np.testing.assert_array_equal(_weight(out, "conv1"), p["W1"][kept])
    feed = _x((1, 3, 6, 6))
    h = _relu(_bn(_conv(feed["x"], p["W1"][kept], p["B1"][kept], 1), *(p[k][kept] for k in "gbmv")))
    _close(out, feed, _conv(h, p["W2"][:, kept], p["B2"], 1))
    # the last conv's output is a graph output: left alone, with the reason
    assert any("graph output" in s["reason"] for s in rec.skipped)


def test_residual_add_prunes_both_sides_the_same_channels():
    r = _rng(2)
    p = {
        k: _w(r, *s)
        for k, s in {"W0": (8, 3, 3, 3), "W1": (8, 8, 1, 1), "W2": (8, 8, 3, 3), "W3": (4, 8, 1, 1)}.items()
    }
    p["W1"][[1, 5]] *= 0.05  # weak on both sides of the Add: the union must drop them from both
    p["W2"][[1, 5]] *= 0.05
    nodes = [
        helper.make_node("Conv", ["x", "W0"], ["c0"], name="c0", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["h"]),
        helper.make_node("Conv", ["h", "W1"], ["p"], name="c1"),
        helper.make_node("Conv", ["h", "W2"], ["q"], name="c2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["p", "q"], ["s"]),
        helper.make_node("Relu", ["s"], ["rs"]),
        helper.make_node("Conv", ["rs", "W3"], ["y"], name="c3"),
    ]
    m = model(nodes, [("x", [1, 3, 5, 5])], [("y", None)], [init(k, v) for k, v in p.items()])
    out, rec = _prune(m, fraction=0.25, criterion="l2")
    assert rec.stats["groups_pruned"] == 2
    k0 = _kept(_l2(p["W0"]), 2)
    k1 = _kept(_l2(p["W1"]) + _l2(p["W2"]), 2)  # the group's importance: summed over both producers
    assert sorted(set(range(8)) - set(k1.tolist())) == [1, 5]
    assert _weight(out, "c1").shape == (6, 6, 1, 1) == _weight(out, "c2").shape[:2] + (1, 1)
    feed = _x((1, 3, 5, 5))
    h = _relu(_conv(feed["x"], p["W0"][k0], None, 1))
    s = _conv(h, p["W1"][k1][:, k0]) + _conv(h, p["W2"][k1][:, k0], None, 1)
    _close(out, feed, _conv(_relu(s), p["W3"][:, k1]))


def test_concat_along_channels_prunes_each_input_by_its_offset():
    r = _rng(3)
    p = {
        k: _w(r, *s)
        for k, s in {"W0": (6, 3, 1, 1), "W1": (4, 6, 3, 3), "W2": (6, 6, 1, 1), "W3": (3, 10, 1, 1)}.items()
    }
    nodes = [
        helper.make_node("Conv", ["x", "W0"], ["c0"], name="c0"),
        helper.make_node("Relu", ["c0"], ["h"]),
        helper.make_node("Conv", ["h", "W1"], ["p"], name="c1", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["h", "W2"], ["q"], name="c2"),
        helper.make_node("Concat", ["p", "q"], ["cat"], axis=1),
        helper.make_node("Sigmoid", ["cat"], ["sg"]),
        helper.make_node("Mul", ["cat", "sg"], ["silu"]),  # SiLU: x * sigmoid(x)
        helper.make_node("Conv", ["silu", "W3"], ["y"], name="c3"),
    ]
    m = model(nodes, [("x", [1, 3, 4, 4])], [("y", None)], [init(k, v) for k, v in p.items()])
    out, rec = _prune(m, fraction=0.5, criterion="l2")
    k0, kp, kq = _kept(_l2(p["W0"]), 3), _kept(_l2(p["W1"]), 2), _kept(_l2(p["W2"]), 3)
    assert _weight(out, "c1").shape[0] == 2 and _weight(out, "c2").shape[0] == 3 and _weight(out, "c3").shape[1] == 5
    feed = _x((1, 3, 4, 4))
    h = _relu(_conv(feed["x"], p["W0"][k0]))
    cat = np.concatenate([_conv(h, p["W1"][kp][:, k0], None, 1), _conv(h, p["W2"][kq][:, k0])], axis=1)
    silu = cat / (1 + np.exp(-cat))
    _close(out, feed, _conv(silu, p["W3"][:, np.concatenate([kp, 4 + kq])]))


@pytest.mark.parametrize("opset", [11, 17])
def test_split_along_channels_rewrites_the_sizes(opset):
    r = _rng(4)
    p = {k: _w(r, *s) for k, s in {"W1": (8, 3, 1, 1), "W2": (3, 2, 3, 3), "W3": (3, 6, 1, 1)}.items()}
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["c1"], name="c1"),
        helper.make_node("Relu", ["c1"], ["h"]),
        helper.make_node("Split", ["h", "sizes"], ["a", "b"], name="split", axis=1)
        if opset >= 13
        else helper.make_node("Split", ["h"], ["a", "b"], name="split", axis=1, split=[2, 6]),
        helper.make_node("Conv", ["a", "W2"], ["ya"], name="c2", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["b", "W3"], ["yb"], name="c3"),
        helper.make_node("Add", ["ya", "yb"], ["y"]),
    ]
    inits = [init(k, v) for k, v in p.items()] + ([init("sizes", np.array([2, 6], np.int64))] if opset >= 13 else [])
    m = model(nodes, [("x", [1, 3, 4, 4])], [("y", None)], inits, opset=opset)
    out, rec = _prune(m, fraction=0.5, criterion="l2")
    norms = _l2(p["W1"])
    ka, kb = _kept(norms[:2], 1), 2 + _kept(norms[2:], 3)  # each part loses its own half
    split = _node(out, "split")
    sizes = _inits(out)[split.input[1]] if opset >= 13 else helper.get_attribute_value(split.attribute[1])
    np.testing.assert_array_equal(sizes, [1, 3])
    feed = _x((1, 3, 4, 4))
    h = _relu(_conv(feed["x"], p["W1"]))
    ref = _conv(h[:, ka], p["W2"][:, ka], None, 1) + _conv(h[:, kb], p["W3"][:, kb - 2])
    _close(out, feed, ref)


@pytest.mark.parametrize("group", [8, 4])
def test_depthwise_and_grouped_conv_drop_whole_groups(group):
    r = _rng(5)
    cg = 8 // group
    p = {"W1": _w(r, 8, 3, 1, 1), "Wg": _w(r, 8, cg, 3, 3), "Bg": _w(r, 8), "W3": _w(r, 4, 8, 1, 1)}
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["c1"], name="c1"),
        helper.make_node("Clip", ["c1", "lo", "hi"], ["h"]),
        helper.make_node("Conv", ["h", "Wg", "Bg"], ["g"], name="cg", group=group, pads=[1, 1, 1, 1]),
        helper.make_node("HardSwish", ["g"], ["hg"]),
        helper.make_node("Conv", ["hg", "W3"], ["y"], name="c3"),
    ]
    inits = [init(k, v) for k, v in p.items()] + [init("lo", np.float32(0)), init("hi", np.float32(6))]
    m = model(nodes, [("x", [1, 3, 5, 5])], [("y", None)], inits)
    out, rec = _prune(m, fraction=0.5, criterion="l2")
    units = _l2(p["W1"]).reshape(group, cg).sum(axis=1)  # a group's importance: its channels' summed norms
    kept_groups = _kept(units, group // 2)
    kept = (kept_groups[:, None] * cg + np.arange(cg)).reshape(-1)
    attrs = {a.name: helper.get_attribute_value(a) for a in _node(out, "cg").attribute}
    assert attrs["group"] == group // 2 and _weight(out, "cg").shape == (4, cg, 3, 3)
    feed = _x((1, 3, 5, 5))
    h = np.clip(_conv(feed["x"], p["W1"][kept]), 0, 6)
    g = _conv(h, p["Wg"][kept], p["Bg"][kept], 1, group // 2)
    hg = g * np.clip(g / 6 + 0.5, 0, 1)
    _close(out, feed, _conv(hg, p["W3"][:, kept]))


@pytest.mark.parametrize("flatten, batch", [("Flatten", 1), ("Reshape", 1), ("Reshape", "N")])
def test_conv_flatten_gemm_takes_each_channels_spatial_block(flatten, batch):
    r = _rng(6)
    p = {"W1": _w(r, 6, 3, 3, 3), "B1": _w(r, 6), "W2": _w(r, 96, 5), "B2": _w(r, 5)}
    inits = [init(k, v) for k, v in p.items()]
    shape = [1 if batch == 1 else -1, 96]  # a symbolic batch: -1 there, the features stay literal
    if flatten == "Flatten":
        flat = helper.make_node("Flatten", ["c"], ["f"], axis=1)
    else:
        flat = helper.make_node("Reshape", ["c", "shape"], ["f"], name="reshape")
        inits.append(init("shape", np.array(shape, np.int64)))
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["c0"], name="c1", pads=[1, 1, 1, 1]),
        helper.make_node("LeakyRelu", ["c0"], ["c"], alpha=0.1),
        flat,
        helper.make_node("Gemm", ["f", "W2", "B2"], ["y"], name="fc"),
    ]
    m = model(nodes, [("x", [batch, 3, 4, 4])], [("y", None)], inits)
    out, rec = _prune(m, fraction=0.5, criterion="l2")
    kept = _kept(_l2(p["W1"]), 3)
    rows = (kept[:, None] * 16 + np.arange(16)).reshape(-1)
    assert _weight(out, "fc").shape == (48, 5)
    if flatten == "Reshape":
        np.testing.assert_array_equal(_inits(out)[_node(out, "reshape").input[1]], [shape[0], 48])
    feed = _x((1 if batch == 1 else 2, 3, 4, 4))
    c = _conv(feed["x"], p["W1"][kept], p["B1"][kept], 1)
    c = np.where(c > 0, c, 0.1 * c)
    _close(out, feed, c.reshape(len(c), -1) @ p["W2"][rows] + p["B2"])


def test_conv_transpose_is_a_producer_and_a_reader():
    r = _rng(11)
    p = {"W1": _w(r, 8, 3, 1, 1), "Wt": _w(r, 8, 6, 2, 2), "Bt": _w(r, 6), "W3": _w(r, 2, 6, 1, 1)}
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["c1"], name="c1"),
        helper.make_node("Relu", ["c1"], ["h"]),
        helper.make_node("ConvTranspose", ["h", "Wt", "Bt"], ["t"], name="ct", strides=[2, 2]),
        helper.make_node("Relu", ["t"], ["ht"]),
        helper.make_node("Conv", ["ht", "W3"], ["y"], name="c3"),
    ]
    m = model(nodes, [("x", [1, 3, 3, 3])], [("y", None)], [init(k, v) for k, v in p.items()])
    out, rec = _prune(m, fraction=0.5, criterion="l2")
    k1, kt = _kept(_l2(p["W1"]), 4), _kept(_l2(p["Wt"], axis=1), 3)
    assert rec.stats["groups_pruned"] == 2 and _weight(out, "ct").shape == (4, 3, 2, 2)
    feed = _x((1, 3, 3, 3))
    h = _relu(_conv(feed["x"], p["W1"][k1]))
    wt = p["Wt"][k1][:, kt].astype(np.float64)
    t = np.einsum("nchw,cmab->nmhawb", h, wt).reshape(1, 3, 6, 6) + p["Bt"][kt].reshape(1, -1, 1, 1)
    _close(out, feed, _conv(_relu(t), p["W3"][:, kt]))


def _mlp():
    r = _rng(7)
    p = {"W1": _w(r, 8, 16), "b1": _w(r, 16), "W2": _w(r, 16, 8), "b2": _w(r, 8)}
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h0"], name="fc1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h"]),
        helper.make_node("MatMul", ["h", "W2"], ["o"], name="fc2"),
        helper.make_node("Add", ["o", "b2"], ["y"]),
    ]
    return model(nodes, [("x", [2, 5, 8])], [("y", None)], [init(k, v) for k, v in p.items()]), p


def test_mlp_hidden_units_are_removed():
    m, p = _mlp()
    out, rec = _prune(m, fraction=0.25, criterion="l1")
    kept = _kept(np.abs(p["W1"]).sum(axis=0), 4)
    assert _weight(out, "fc1").shape == (8, 12) and _weight(out, "fc2").shape == (12, 8)
    feed = _x((2, 5, 8))
    h = _relu(feed["x"] @ p["W1"][:, kept] + p["b1"][kept])
    _close(out, feed, h @ p["W2"][kept] + p["b2"])


def test_gemm_chain_with_trans_b_alpha_beta_and_recovery():
    r = _rng(15)
    p = {"W1": _w(r, 10, 6), "B1": _w(r, 10), "W2": _w(r, 3, 10), "C2": _w(r, 3)}
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "B1"], ["h0"], name="g1", transB=1, alpha=0.5),
        helper.make_node("Relu", ["h0"], ["h"]),
        helper.make_node("Gemm", ["h", "W2", "C2"], ["y"], name="g2", transB=1, beta=2.0),
    ]
    m = model(nodes, [("x", [4, 6])], [("y", None)], [init(k, v) for k, v in p.items()])
    out, _ = _prune(m, fraction=0.5, criterion="l2")
    kept = _kept(_l2(p["W1"]), 5)
    assert _weight(out, "g1").shape == (5, 6) and _weight(out, "g2").shape == (3, 5)
    feed = _x((4, 6))
    h = _relu(0.5 * feed["x"] @ p["W1"][kept].T + p["B1"][kept])
    _close(out, feed, h @ p["W2"][:, kept].T + 2.0 * p["C2"])
    basis = r.standard_normal((2, 6))
    data = [
        {"x": (r.standard_normal((4, 2)) @ basis + 0.05 * r.standard_normal((4, 6))).astype(np.float32)}
        for _ in range(20)
    ]
    calib, held = data[:16], data[16:]

    def error(o):
        return np.mean([np.mean((_run(o, f) - _run(m, f)) ** 2) for f in held])

    fitted, rec = _prune(m, calibration=calib, fraction=0.5, criterion="l2", recovery="least_squares")
    assert rec.stats["layers_refit"] == 1 and error(fitted) < 0.5 * error(out)


def test_attention_heads_are_blocked_with_a_reason():
    r = _rng(8)
    p = {k: _w(r, 8, 8) for k in ("Wq", "Wk", "Wv", "Wo")}
    nodes = [
        helper.make_node("MatMul", ["x", "Wq"], ["q"], name="q_proj"),
        helper.make_node("MatMul", ["x", "Wk"], ["k"], name="k_proj"),
        helper.make_node("MatMul", ["x", "Wv"], ["v"], name="v_proj"),
        helper.make_node("Reshape", ["q", "heads"], ["qh"]),
        helper.make_node("Reshape", ["k", "heads"], ["kh"]),
        helper.make_node("Reshape", ["v", "heads"], ["vh"]),
        helper.make_node("Transpose", ["qh"], ["qt"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["kh"], ["kt"], perm=[0, 2, 3, 1]),
        helper.make_node("Transpose", ["vh"], ["vt"], perm=[0, 2, 1, 3]),
        helper.make_node("MatMul", ["qt", "kt"], ["s"]),
        helper.make_node("Softmax", ["s"], ["a"], axis=-1),
        helper.make_node("MatMul", ["a", "vt"], ["ctx"]),
        helper.make_node("Transpose", ["ctx"], ["ct"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ct", "merged"], ["cm"]),
        helper.make_node("MatMul", ["cm", "Wo"], ["y"], name="o_proj"),
    ]
    inits = [init(k, v) for k, v in p.items()]
    inits += [init("heads", np.array([1, 4, 2, 4], np.int64)), init("merged", np.array([1, 4, 8], np.int64))]
    m = model(nodes, [("x", [1, 4, 8])], [("y", None)], inits)
    out, rec = _prune(m, fraction=0.5)
    assert not rec.modified
    reasons = " ".join(s["reason"] for s in rec.skipped)
    assert "attention heads are not pruned" in reasons and rec.stats["groups_blocked"] >= 3


# ------------------------------------------------------------------------------------------- policy
def test_a_group_reaching_a_graph_output_is_left_alone():
    r = _rng(9)
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="c"),
        helper.make_node("Relu", ["c"], ["y"]),
        helper.make_node("Conv", ["y", "W2"], ["z"], name="c2"),
    ]
    m = model(
        nodes,
        [("x", [1, 3, 4, 4])],
        [("y", None), ("z", None)],
        [init("W", _w(r, 8, 3, 1, 1)), init("W2", _w(r, 2, 8, 1, 1))],
    )
    out, rec = _prune(m, fraction=0.5)
    assert not rec.modified and _weight(out, "c").shape[0] == 8
    assert any("'y' is a graph output" in s["reason"] for s in rec.skipped)


def _blocked_case(case):
    r = _rng(12)
    inits = [init("W", _w(r, 8, 3, 1, 1)), init("W2", _w(r, 2, 8, 1, 1))]
    inputs, outputs = [("x", [1, 3, 4, 4])], [("y", None)]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="c"), helper.make_node("Relu", ["c"], ["h"])]
    if case == "subgraph":
        branch = [helper.make_node("ReduceSum", ["h"], ["t"], keepdims=0)]
        then_g = helper.make_graph(
            branch, "then", [], [helper.make_tensor_value_info("t", onnx.TensorProto.FLOAT, None)]
        )
        else_g = helper.make_graph(
            [helper.make_node("Constant", [], ["e"], value_float=0.0)],
            "else",
            [],
            [helper.make_tensor_value_info("e", onnx.TensorProto.FLOAT, None)],
        )
        nodes.append(helper.make_node("If", ["cond"], ["z"], then_branch=then_g, else_branch=else_g))
        inputs.append(helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, []))
        outputs.append(("z", None))
    elif case == "shape":
        nodes.append(helper.make_node("Shape", ["h"], ["shp"]))
        outputs.append(helper.make_tensor_value_info("shp", onnx.TensorProto.INT64, None))
    elif case == "computed weight":
        nodes.append(helper.make_node("Mul", ["W2", "two"], ["W2x"]))
        inits.append(init("two", np.float32(2)))
    elif case == "concat with an input":
        nodes.append(helper.make_node("Concat", ["h", "x"], ["hx"], axis=1))
        inits[1] = init("W2", _w(r, 2, 11, 1, 1))
    elif case == "dynamic flatten":
        inputs = [("x", [1, 3, "H", "W"])]
        nodes.append(helper.make_node("Flatten", ["h"], ["f"]))
        nodes.append(helper.make_node("MatMul", ["f", "Wf"], ["y"]))
        inits.append(init("Wf", _w(r, 128, 2)))
    if case != "dynamic flatten":
        src = {"computed weight": ("h", "W2x"), "concat with an input": ("hx", "W2")}.get(case, ("h", "W2"))
        nodes.append(helper.make_node("Conv", list(src), ["y"], name="c2"))
    return model(nodes, inputs, outputs, inits)


@pytest.mark.parametrize(
    "case, reason",
    [
        ("subgraph", "read inside a subgraph"),
        ("shape", "read by Shape"),
        ("computed weight", "computed weight"),
        ("concat with an input", "no layer can drop"),
        ("dynamic flatten", "of unknown shape"),
    ],
)
def test_what_the_analysis_cannot_follow_is_left_alone_with_the_reason(case, reason):
    out, rec = _prune(_blocked_case(case), fraction=0.5)
    assert not rec.modified and _weight(out, "c").shape[0] == 8
    assert any(reason in s["reason"] for s in rec.skipped), rec.skipped


@pytest.mark.parametrize("bad", [1.0, 1.5, -0.1])
def test_bad_fraction_is_a_usage_error(bad):
    with pytest.raises(UsageError) as e:
        PruneChannels(fraction=bad)
    assert "fraction must be in [0, 1)" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UsageError, match="fraction"):
        optimize(_mlp()[0], [f"prune_channels:fraction={bad}"])
    with pytest.raises(UsageError, match="layer_fraction"):
        PruneChannels(layer_fraction=["fc1=2"])


def test_keep_first_last_exclude_nodes_layer_fraction_and_channel_multiple():
    m, _ = _mlp()
    _, rec = _prune(m, keep_first_last=True)
    assert not rec.modified and any("keep_first_last" in s["reason"] for s in rec.skipped)
    _, rec = _prune(m, exclude_nodes=["op:MatMul"])
    assert not rec.modified and any("exclude_nodes" in s["reason"] for s in rec.skipped)
    out, _ = _prune(m, fraction=0.25, layer_fraction=["fc*=0.5"])
    assert _weight(out, "fc1").shape == (8, 8)
    out, _ = _prune(m, fraction=0.4)
    assert _weight(out, "fc1").shape == (8, 10)  # 16 - floor(6.4)
    out, _ = _prune(m, fraction=0.4, channel_multiple=4)
    assert _weight(out, "fc1").shape == (8, 12)  # 10 rounded to the nearest multiple of 4


def _correlated_pair():
    """x -> Conv1 (1x1, 8 channels that are mixes of 2 directions + a little noise) -> Conv2: channels are nearly
    redundant, so the kept ones can stand in for the removed ones once Conv2 is refit."""
    r = _rng(10)
    basis = r.standard_normal((2, 4))
    w1 = (r.standard_normal((8, 2)) @ basis + 0.02 * r.standard_normal((8, 4))).astype(np.float32)
    p = {"W1": w1.reshape(8, 4, 1, 1), "W2": _w(r, 3, 8, 3, 3), "B2": _w(r, 3)}
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["h"], name="c1"),
        helper.make_node("Conv", ["h", "W2", "B2"], ["y"], name="c2", pads=[1, 1, 1, 1]),
    ]
    return model(nodes, [("x", [1, 4, 6, 6])], [("y", None)], [init(k, v) for k, v in p.items()]), p


def test_least_squares_recovery_lowers_the_output_error():
    m, _ = _correlated_pair()
    calib = [_x((1, 4, 6, 6), seed=s) for s in range(20, 36)]
    held = [_x((1, 4, 6, 6), seed=s) for s in range(40, 46)]

    def error(out):
        return np.mean([np.mean((_run(out, f) - _run(m, f)) ** 2) for f in held])

    plain, rec0 = _prune(m, calibration=calib, fraction=0.5, criterion="l2", recovery="none")
    fitted, rec1 = _prune(m, calibration=calib, fraction=0.5, criterion="l2", recovery="least_squares")
    assert rec1.stats["layers_refit"] == 1 and "layers_refit" not in rec0.stats
    assert _weight(plain, "c2").shape == _weight(fitted, "c2").shape == (3, 4, 3, 3)
    e0, e1 = error(plain), error(fitted)
    assert e1 < 0.2 * e0, (e0, e1)


def test_recovery_moves_the_removed_channels_mean_into_the_bias():
    # independent channels with large means: nothing to regress on, the mean shift W_R E[x_R] is the recovery
    r = _rng(14)
    p = {"W1": (np.eye(8) + 0.1 * r.standard_normal((8, 8))).astype(np.float32).reshape(8, 8, 1, 1)}
    p.update(B1=(3 + r.random(8)).astype(np.float32), W2=_w(r, 3, 8, 1, 1))
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["h"], name="c1"),
        helper.make_node("Conv", ["h", "W2"], ["y"], name="c2"),  # no bias: recovery adds one
    ]
    m = model(nodes, [("x", [1, 8, 4, 4])], [("y", None)], [init(k, v) for k, v in p.items()])
    calib, held = [_x((1, 8, 4, 4), seed=s) for s in range(50, 62)], [_x((1, 8, 4, 4), seed=s) for s in range(70, 74)]

    def error(out):
        return np.mean([np.mean((_run(out, f) - _run(m, f)) ** 2) for f in held])

    plain, _ = _prune(m, calibration=calib, fraction=0.5, criterion="l2", recovery="none")
    fitted, _ = _prune(m, calibration=calib, fraction=0.5, criterion="l2", recovery="least_squares")
    assert len(_node(fitted, "c2").input) == 3 and _weight(fitted, "c2", 2).shape == (3,)
    assert error(fitted) < 0.3 * error(plain), (error(fitted), error(plain))


def test_recovery_refits_a_matmul_and_its_following_bias():
    m, p = _mlp()
    r = _rng(13)
    basis = r.standard_normal((3, 8))

    def feed(n):  # low-rank inputs: the hidden units are correlated
        return {"x": (r.standard_normal((2, 5, 3)) @ basis + 0.05 * r.standard_normal((2, 5, 8))).astype(np.float32)}

    calib, held = [feed(i) for i in range(12)], [feed(i) for i in range(4)]

    def error(out):
        return np.mean([np.mean((_run(out, f) - _run(m, f)) ** 2) for f in held])

    plain, _ = _prune(m, calibration=calib, fraction=0.5, criterion="l2", recovery="none")
    fitted, rec = _prune(m, calibration=calib, fraction=0.5, criterion="l2", recovery="least_squares")
    assert rec.stats["layers_refit"] == 1
    assert error(fitted) < 0.5 * error(plain)


def test_activation_criterion_ranks_by_measured_contribution():
    m, p = _mlp()
    calib = [_x((2, 5, 8), seed=s) for s in range(3)]
    out, rec = _prune(m, calibration=calib, fraction=0.25, recovery="none")  # auto: activation with data
    h = np.concatenate([_relu(f["x"] @ p["W1"] + p["b1"]).reshape(-1, 16) for f in calib]).astype(np.float64)
    kept = _kept(np.sqrt((h**2).sum(axis=0)) * _l2(p["W2"]), 4)
    np.testing.assert_array_equal(_weight(out, "fc1"), p["W1"][:, kept])


def test_contract_in_lossy_mode():
    # two nearly dead channels: pruning them keeps the outputs' cosine far above the declared floor
    m, p = _conv_bn_relu_conv(dead=(2, 6))
    feeds = [_x((1, 3, 6, 6), seed=s) for s in range(3)]
    out = check_pass_contract(
        PruneChannels(fraction=0.25, keep_first_last=False, channel_multiple=1), m, feeds, expect_modified=True
    )
    assert _weight(out, "conv1").shape[0] == 6
