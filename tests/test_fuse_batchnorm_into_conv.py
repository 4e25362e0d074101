from __future__ import annotations

import numpy as np
import pytest
from onnx import helper, numpy_helper

from onnxslim.passes.slim.fuse_batchnorm_into_conv import FuseBatchnormIntoConv
from onnxslim.pipeline import optimize
from onnxslim.testing import check_pass_contract

from _fusion_testlib import init, model, ops, rng, run_pass


def _bn_inits(c: int, prefix: str = "bn", seed: int = 3):
    r = rng(seed)
    return [
        init(f"{prefix}_g", r.uniform(0.5, 2, c).astype(np.float32)),
        init(f"{prefix}_b", r.standard_normal(c).astype(np.float32)),
        init(f"{prefix}_m", r.standard_normal(c).astype(np.float32)),
        init(f"{prefix}_v", r.uniform(0.1, 3, c).astype(np.float32)),
    ]


def _bn(x: str, y: str, prefix: str = "bn", **attrs):
    return helper.make_node(
        "BatchNormalization",
        [x, f"{prefix}_g", f"{prefix}_b", f"{prefix}_m", f"{prefix}_v"],
        [y],
        epsilon=1e-3,
        **attrs,
    )


@pytest.mark.parametrize("bias", [False, True])
def test_conv_bn_fused(bias):
    r = rng()
    inits = [init("W", r.standard_normal((4, 3, 3, 3)).astype(np.float32)), *_bn_inits(4)]
    conv_in = ["x", "W"]
    if bias:
        inits.append(init("B", r.standard_normal(4).astype(np.float32)))
        conv_in.append("B")
    m = model(
        [helper.make_node("Conv", conv_in, ["c"], pads=[1, 1, 1, 1]), _bn("c", "y")],
        [("x", [2, 3, 5, 5])],
        [("y", None)],
        inits,
    )
    out = run_pass(FuseBatchnormIntoConv(), m)
    assert ops(out) == {"Conv": 1}
    assert len(out.graph.node[0].input) == 3


@pytest.mark.parametrize("op,wshape", [("Conv", (4, 3, 3, 3)), ("ConvTranspose", (6, 2, 3, 3))])
def test_grouped_conv_and_conv_transpose(op, wshape):
    # group=2: Conv W [C_out, C_in/g, k, k]; ConvTranspose W [C_in, C_out/g, k, k] → C_out = 4 in both.
    r = rng(5)
    inits = [
        init("W", r.standard_normal(wshape).astype(np.float32)),
        init("B", r.standard_normal(4).astype(np.float32)),
        *_bn_inits(4),
    ]
    cin = 6
    m = model(
        [helper.make_node(op, ["x", "W", "B"], ["c"], group=2), _bn("c", "y")],
        [("x", [1, cin, 4, 4])],
        [("y", None)],
        inits,
    )
    out = run_pass(FuseBatchnormIntoConv(), m)
    assert ops(out) == {op: 1}


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("cshape", [(4,), (3, 4), None])
def test_gemm_bn_fused(trans_b, cshape):
    r = rng(7)
    b = r.standard_normal((5, 4) if not trans_b else (4, 5)).astype(np.float32)
    inits = [init("B", b), *_bn_inits(4)]
    gemm_in = ["x", "B"]
    if cshape:
        inits.append(init("C", r.standard_normal(cshape).astype(np.float32)))
        gemm_in.append("C")
    m = model(
        [helper.make_node("Gemm", gemm_in, ["g"], transB=trans_b, alpha=0.7, beta=1.3), _bn("g", "y")],
        [("x", [3, 5])],
        [("y", None)],
        inits,
    )
    out = run_pass(FuseBatchnormIntoConv(), m)
    assert ops(out) == {"Gemm": 1}


def test_conv1d_float16():
    r = rng(9)
    inits = [init("W", r.standard_normal((4, 3, 3)).astype(np.float16))]
    inits += [init(t.name, numpy_helper.to_array(t).astype(np.float16)) for t in _bn_inits(4)]
    x = helper.make_tensor_value_info("x", 10, [1, 3, 8])
    m = model(
        [helper.make_node("Conv", ["x", "W"], ["c"]), _bn("c", "y")],
        [x],
        [helper.make_tensor_value_info("y", 10, [1, 4, 6])],
        inits,
    )
    feeds = [{"x": r.standard_normal((1, 3, 8)).astype(np.float16)}]
    out = check_pass_contract(FuseBatchnormIntoConv(), m, feeds, rtol=1e-2, atol=1e-2, expect_modified=True)
    assert ops(out) == {"Conv": 1}
    assert out.graph.initializer[0].data_type == 10


def test_conv_output_read_elsewhere_is_skipped():
    r = rng()
    inits = [init("W", r.standard_normal((4, 3, 1, 1)).astype(np.float32)), *_bn_inits(4)]
    m = model(
        [helper.make_node("Conv", ["x", "W"], ["c"]), _bn("c", "b"), helper.make_node("Add", ["b", "c"], ["y"])],
        [("x", [1, 3, 4, 4])],
        [("y", None)],
        inits,
    )
    p = FuseBatchnormIntoConv()
    out = run_pass(p, m, expect_modified=False)
    assert ops(out)["BatchNormalization"] == 1


def test_shared_constants_are_not_edited_in_place():
    # Two Conv+BN pairs share the bias and all BN parameters: editing one in place would break the other.
    r = rng(11)
    inits = [
        init("W1", r.standard_normal((4, 3, 1, 1)).astype(np.float32)),
        init("W2", r.standard_normal((4, 3, 1, 1)).astype(np.float32)),
        init("B", r.standard_normal(4).astype(np.float32)),
        *_bn_inits(4),
    ]
    m = model(
        [
            helper.make_node("Conv", ["x", "W1", "B"], ["c1"]),
            _bn("c1", "y1"),
            helper.make_node("Conv", ["x", "W2", "B"], ["c2"]),
            _bn("c2", "y2"),
        ],
        [("x", [1, 3, 4, 4])],
        [("y1", None), ("y2", None)],
        inits,
    )
    out = run_pass(FuseBatchnormIntoConv(), m)
    assert ops(out) == {"Conv": 2}


def test_shared_weight_is_skipped():
    # A scaled copy of W beside the original would grow the model.
    r = rng(12)
    inits = [init("W", r.standard_normal((4, 3, 1, 1)).astype(np.float32)), *_bn_inits(4)]
    m = model(
        [helper.make_node("Conv", ["x", "W"], ["c1"]), _bn("c1", "y1"), helper.make_node("Conv", ["x", "W"], ["y2"])],
        [("x", [1, 3, 4, 4])],
        [("y1", None), ("y2", None)],
        inits,
    )
    out, rep = optimize(m, [FuseBatchnormIntoConv()], fixed_point=False)
    assert not rep.passes[0].modified and "shared" in rep.passes[0].skipped[0]["reason"]
    assert ops(out)["BatchNormalization"] == 1


def test_training_mode_is_skipped():
    r = rng()
    inits = [init("W", r.standard_normal((4, 3, 1, 1)).astype(np.float32)), *_bn_inits(4)]
    m = model(
        [helper.make_node("Conv", ["x", "W"], ["c"]), _bn("c", "y", training_mode=0)],
        [("x", [1, 3, 4, 4])],
        [("y", None)],
        inits,
    )
    run_pass(FuseBatchnormIntoConv(), m)  # training_mode=0 is inference: fused
    m.graph.node[1].attribute[-1].i = 1
    _, rep = optimize(m, [FuseBatchnormIntoConv()], fixed_point=False)
    assert not rep.passes[0].modified and "training_mode" in rep.passes[0].skipped[0]["reason"]


def test_fused_inside_if_and_loop_bodies():
    # Weights live in Constant nodes inside the bodies (as in the wine_ifloop sample); C_out = C_in = 3.
    r = rng(13)
    w = r.standard_normal((3, 3, 1, 1)).astype(np.float32)
    shape = [1, 3, 4, 4]

    def body(name, x):
        consts = [
            helper.make_node("Constant", [], [t.name], value=t)
            for t in [init(f"{name}_W", w), *_bn_inits(3, prefix=name)]
        ]
        return consts + [
            helper.make_node("Conv", [x, f"{name}_W"], [f"{name}_c"]),
            _bn(f"{name}_c", f"{name}_y", prefix=name),
        ]

    def vi(name, elem=1, shp=shape):
        return helper.make_tensor_value_info(name, elem, shp)

    then_g = helper.make_graph(body("t", "x"), "then", [], [vi("t_y")])
    else_g = helper.make_graph([helper.make_node("Identity", ["x"], ["e_y"])], "else", [], [vi("e_y")])
    loop_body = helper.make_graph(
        body("l", "h_in") + [helper.make_node("Identity", ["cond"], ["cond_out"])],
        "loop",
        [vi("i", 7, []), vi("cond", 9, []), vi("h_in")],
        [vi("cond_out", 9, []), vi("l_y")],
    )
    nodes = [
        helper.make_node("If", ["flag"], ["yi"], then_branch=then_g, else_branch=else_g),
        helper.make_node("Loop", ["trips", "", "x"], ["yl"], body=loop_body),
    ]
    m = model(
        nodes, [("x", shape), vi("flag", 9, [])], [("yi", shape), ("yl", shape)], [init("trips", np.array(2, np.int64))]
    )
    feeds = [{"x": r.standard_normal(shape).astype(np.float32), "flag": np.array(f)} for f in (True, False)]
    before = ops(m)
    out = run_pass(FuseBatchnormIntoConv(), m, feeds=feeds)
    after = ops(out)
    assert after["BatchNormalization"] == 0 and before["BatchNormalization"] == 2
    assert after["Conv"] == 2
    assert after["Constant"] == 0  # old W and BN params went; the fused weights are body initializers
