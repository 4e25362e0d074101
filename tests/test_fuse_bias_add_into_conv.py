from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from onnxslim.passes.slim.fuse_bias_add_into_conv import FuseBiasAddIntoConv
from onnxslim.pipeline import optimize

from _fusion_testlib import init, model, ops, rng, run_pass


@pytest.mark.parametrize("cshape", [(4,), (1, 4, 1, 1), (4, 1, 1), (), (1,)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("swap", [False, True])
def test_per_channel_add_becomes_bias(cshape, bias, swap):
    # A [4] constant broadcasts along the last (width) axis, not the channels: never a bias.
    r = rng(1)
    conv_in = ["x", "W"] + (["B"] if bias else [])
    inits = [
        init("W", r.standard_normal((4, 3, 3, 3)).astype(np.float32)),
        init("c", r.standard_normal(cshape).astype(np.float32)),
    ]
    if bias:
        inits.append(init("B", r.standard_normal(4).astype(np.float32)))
    add_in = ["c", "y0"] if swap else ["y0", "c"]
    m = model(
        [helper.make_node("Conv", conv_in, ["y0"]), helper.make_node("Add", add_in, ["y"])],
        [("x", [2, 3, 6, 6])],
        [("y", None)],
        inits,
    )
    if cshape == (4,) or (cshape in ((), (1,)) and not bias):
        # (4,) broadcasts along width; a scalar would become a [4] bias where there was none (bigger model)
        out = run_pass(FuseBiasAddIntoConv(), m, expect_modified=False)
        assert ops(out)["Add"] == 1
        return
    out = run_pass(FuseBiasAddIntoConv(), m)
    assert ops(out) == {"Conv": 1}


def test_conv_transpose_grouped():
    r = rng(2)
    inits = [
        init("W", r.standard_normal((6, 2, 3, 3)).astype(np.float32)),
        init("c", r.standard_normal((1, 4, 1, 1)).astype(np.float32)),
    ]
    m = model(
        [helper.make_node("ConvTranspose", ["x", "W"], ["y0"], group=2), helper.make_node("Add", ["y0", "c"], ["y"])],
        [("x", [1, 6, 4, 4])],
        [("y", None)],
        inits,
    )
    out = run_pass(FuseBiasAddIntoConv(), m)
    assert ops(out) == {"ConvTranspose": 1}


def test_not_fused_when_add_grows_or_conv_shared():
    r = rng(3)
    w = init("W", r.standard_normal((4, 3, 1, 1)).astype(np.float32))
    # spatial constant: not a per-channel bias
    m = model(
        [helper.make_node("Conv", ["x", "W"], ["y0"]), helper.make_node("Add", ["y0", "c"], ["y"])],
        [("x", [1, 3, 4, 4])],
        [("y", None)],
        [w, init("c", r.standard_normal((1, 4, 4, 4)).astype(np.float32))],
    )
    _, rep = optimize(m, [FuseBiasAddIntoConv()], fixed_point=False)
    assert not rep.passes[0].modified and "per-output-channel" in rep.passes[0].skipped[0]["reason"]
    # conv output read twice
    m = model(
        [
            helper.make_node("Conv", ["x", "W"], ["y0"]),
            helper.make_node("Add", ["y0", "c"], ["y"]),
            helper.make_node("Relu", ["y0"], ["z"]),
        ],
        [("x", [1, 3, 4, 4])],
        [("y", None), ("z", None)],
        [w, init("c", np.ones((4, 1, 1), np.float32))],
    )
    out = run_pass(FuseBiasAddIntoConv(), m, expect_modified=False)
    assert ops(out)["Add"] == 1
