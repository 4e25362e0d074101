from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from onnxslim.passes.slim.fuse_scale_into_conv import FuseScaleIntoConv
from onnxslim.pipeline import optimize

from _fusion_testlib import init, model, ops, rng, run_pass


@pytest.mark.parametrize("op", ["Mul", "Div"])
@pytest.mark.parametrize("cshape", [(1, 4, 1, 1), (4, 1, 1), ()])
@pytest.mark.parametrize("bias", [False, True])
def test_per_channel_scale_folded(op, cshape, bias):
    r = rng(1)
    conv_in = ["x", "W"] + (["B"] if bias else [])
    inits = [
        init("W", r.standard_normal((4, 3, 3, 3)).astype(np.float32)),
        init("s", r.uniform(0.5, 2.0, cshape).astype(np.float32)),
    ]
    if bias:
        inits.append(init("B", r.standard_normal(4).astype(np.float32)))
    m = model(
        [helper.make_node("Conv", conv_in, ["y0"], pads=[1, 1, 1, 1]), helper.make_node(op, ["y0", "s"], ["y"])],
        [("x", [2, 3, 5, 5])],
        [("y", None)],
        inits,
    )
    out = run_pass(FuseScaleIntoConv(), m)
    assert ops(out) == {"Conv": 1}


def test_mul_with_constant_first_and_grouped_conv_transpose():
    r = rng(2)
    inits = [
        init("W", r.standard_normal((6, 2, 3, 3)).astype(np.float32)),
        init("s", r.uniform(-2, 2, (1, 4, 1, 1)).astype(np.float32)),
    ]
    m = model(
        [helper.make_node("ConvTranspose", ["x", "W"], ["y0"], group=2), helper.make_node("Mul", ["s", "y0"], ["y"])],
        [("x", [1, 6, 4, 4])],
        [("y", None)],
        inits,
    )
    out = run_pass(FuseScaleIntoConv(), m)
    assert ops(out) == {"ConvTranspose": 1}


def test_skips_div_by_conv_zero_divisor_and_spatial_scale():
    r = rng(3)
    w = init("W", r.standard_normal((4, 3, 1, 1)).astype(np.float32))
    cases = [
        ("Div", ["s", "y0"], np.full((1, 4, 1, 1), 2, np.float32), None),  # s / conv is not affine
        ("Div", ["y0", "s"], np.array([1, 0, 1, 1], np.float32).reshape(4, 1, 1), "division by zero"),
        ("Mul", ["y0", "s"], r.standard_normal((1, 1, 4, 4)).astype(np.float32), "per output channel"),
    ]
    for op, ins, s, reason in cases:
        m = model(
            [helper.make_node("Conv", ["x", "W"], ["y0"]), helper.make_node(op, ins, ["y"])],
            [("x", [1, 3, 4, 4])],
            [("y", None)],
            [w, init("s", s)],
        )
        _, rep = optimize(m, [FuseScaleIntoConv()], fixed_point=False)
        assert not rep.passes[0].modified
        if reason:
            assert reason in rep.passes[0].skipped[0]["reason"]
