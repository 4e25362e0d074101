"""Property test: random Conv/ConvTranspose/Gemm chains with BN, per-channel Add/Mul/Div, Pad and layout ops,
some intermediates read twice or exposed as graph outputs. All fusion passes together must keep outputs
(rtol 1e-4, atol 1e-5), never add nodes, and reach a fixed point."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper

from onnxslim.pipeline import optimize
from onnxslim.testing import assert_outputs_close, run_model

from _fusion_testlib import ATOL, RTOL, init, model, ops

FUSIONS = [
    "fuse_pad_into_conv",
    "fuse_batchnorm_into_conv",
    "fuse_bias_add_into_conv",
    "fuse_scale_into_conv",
    "fuse_matmul_add_into_gemm",
    "collapse_reshape_chains",
]


@st.composite
def conv_chains(draw):
    seed = draw(st.integers(0, 2**16))
    r = np.random.default_rng(seed)
    nodes, inits, outputs = [], [], []
    c, cur, k = 4, "x", 0

    def name(p):
        nonlocal k
        k += 1
        return f"{p}{k}"

    def const(arr):
        n = name("k")
        inits.append(init(n, np.asarray(arr, np.float32)))
        return n

    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["Conv", "Conv", "ConvTranspose"]))
        group = draw(st.sampled_from([1, 2]))
        cout = draw(st.sampled_from([2, 4]))
        if draw(st.booleans()):  # a zero Pad in front (only Conv can absorb it)
            p = name("p")
            pads = [0, 0, *r.integers(0, 2, 2), 0, 0, *r.integers(0, 2, 2)]
            pads_t = name("pads")
            inits.append(init(pads_t, np.asarray(pads, np.int64)))
            nodes.append(helper.make_node("Pad", [cur, pads_t], [p]))
            cur = p
        wshape = (cout, c // group, 1, 1) if op == "Conv" else (c, cout // group, 1, 1)
        ins = [cur, const(r.standard_normal(wshape))]
        if draw(st.booleans()):
            ins.append(const(r.standard_normal(cout)))
        out = name("c")
        nodes.append(helper.make_node(op, ins, [out], group=group))
        cur, c = out, cout
        for post in draw(
            st.lists(st.sampled_from(["BN", "Add", "Mul", "Div", "Relu", "Transpose", "Squeeze"]), max_size=3)
        ):
            out = name("t")
            shape = draw(st.sampled_from([(c,), (1, c, 1, 1), (c, 1, 1), ()]))
            if post == "BN":
                bn = [
                    const(r.uniform(0.5, 2, c)),
                    const(r.standard_normal(c)),
                    const(r.standard_normal(c)),
                    const(r.uniform(0.2, 2, c)),
                ]
                nodes.append(helper.make_node("BatchNormalization", [cur, *bn], [out]))
            elif post in ("Add", "Mul", "Div"):
                if shape == (c,):
                    shape = (1, c, 1, 1)
                v = r.uniform(0.5, 2, shape) * r.choice([-1, 1], shape)
                nodes.append(helper.make_node(post, [cur, const(v)], [out]))
            elif post == "Relu":
                nodes.append(helper.make_node("Relu", [cur], [out]))
            elif post == "Transpose":
                mid = name("t")
                nodes.append(helper.make_node("Transpose", [cur], [mid], perm=[0, 2, 3, 1]))
                nodes.append(helper.make_node("Transpose", [mid], [out], perm=[0, 3, 1, 2]))
            else:
                mid = name("t")
                ax = const(np.array([0]))
                inits[-1] = init(ax, np.array([0], np.int64))
                nodes.append(helper.make_node("Squeeze", [cur, ax], [mid]))
                nodes.append(helper.make_node("Unsqueeze", [mid, ax], [out]))
            if draw(st.integers(0, 5)) == 0:  # an extra reader or a graph output in the middle
                outputs.append(cur)
            cur = out
    outputs.append(cur)
    m = model(nodes, [("x", [1, 4, 3, 3])], [(o, None) for o in outputs], inits)
    return m, seed


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(conv_chains())
def test_random_conv_chains_keep_outputs(case):
    m, seed = case
    # One pass can expose work for another (Conv→Transpose pair→BN), so run the list to its fixed point.
    out, _ = optimize(m, FUSIONS, on_pass_error="raise", fixed_point=True)
    assert sum(ops(out).values()) <= sum(ops(m).values())
    baseline, _ = optimize(m, [], fixed_point=False)  # the export round trip alone moves a few bytes
    assert out.ByteSize() <= baseline.ByteSize() + 64  # fresh constants' names may be a little longer
    feed = {"x": np.random.default_rng(seed).standard_normal((1, 4, 3, 3)).astype(np.float32)}
    assert_outputs_close(run_model(m, feed), run_model(out, feed), None, RTOL, ATOL)
    _, rep = optimize(out, FUSIONS, on_pass_error="raise", fixed_point=False)
    assert not any(r.modified for r in rep.passes), [(r.name, r.stats) for r in rep.passes if r.modified]
