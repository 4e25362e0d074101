from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from onnxslim.passes.slim.fuse_pad_into_conv import FusePadIntoConv
from onnxslim.pipeline import optimize

from _fusion_testlib import init, model, ops, rng, run_pass

X = [1, 3, 6, 6]


def _pad_model(target: str, pad_pads, value=None, mode="constant", opset=17, **attrs):
    r = rng(1)
    inits = [init("p", np.asarray(pad_pads, np.int64))]
    pad_in = ["x", "p"]
    if value is not None:
        inits.append(init("v", np.array(value, np.float32)))
        pad_in.append("v")
    if target == "Conv":
        inits.append(init("W", r.standard_normal((4, 3, 3, 3)).astype(np.float32)))
        tnode = helper.make_node("Conv", ["xp", "W"], ["y"], **attrs)
    else:
        tnode = helper.make_node(target, ["xp"], ["y"], kernel_shape=[3, 3], **attrs)
    return model(
        [helper.make_node("Pad", pad_in, ["xp"], mode=mode), tnode], [("x", X)], [("y", None)], inits, opset=opset
    )


@pytest.mark.parametrize("conv_pads", [None, [1, 0, 0, 1]])
def test_zero_pad_into_conv(conv_pads):
    attrs = {"pads": conv_pads} if conv_pads else {}
    m = _pad_model("Conv", [0, 0, 1, 2, 0, 0, 2, 1], **attrs)
    out = run_pass(FusePadIntoConv(), m)
    assert ops(out) == {"Conv": 1}
    pads = next(a.ints for a in out.graph.node[0].attribute if a.name == "pads")
    base = conv_pads or [0, 0, 0, 0]
    assert list(pads) == [base[0] + 1, base[1] + 2, base[2] + 2, base[3] + 1]


def test_opset_10_pad_attributes():
    r = rng(2)
    m = model(
        [
            helper.make_node("Pad", ["x"], ["xp"], pads=[0, 0, 1, 1, 0, 0, 1, 1]),
            helper.make_node("Conv", ["xp", "W"], ["y"]),
        ],
        [("x", X)],
        [("y", None)],
        [init("W", r.standard_normal((4, 3, 3, 3)).astype(np.float32))],
        opset=10,
    )
    out = run_pass(FusePadIntoConv(), m)
    assert ops(out) == {"Conv": 1}


@pytest.mark.parametrize("cip,pool_pads", [(0, None), (1, [1, 1, 1, 1])])
def test_average_pool(cip, pool_pads):
    attrs = {"count_include_pad": cip}
    if pool_pads:
        attrs["pads"] = pool_pads
    m = _pad_model("AveragePool", [0, 0, 1, 1, 0, 0, 1, 1], **attrs)
    out = run_pass(FusePadIntoConv(), m)
    assert ops(out) == {"AveragePool": 1}


def test_average_pool_excluding_own_pads_is_skipped():
    m = _pad_model("AveragePool", [0, 0, 1, 1, 0, 0, 1, 1], count_include_pad=0, pads=[1, 1, 1, 1])
    out = run_pass(FusePadIntoConv(), m, expect_modified=False)
    assert ops(out)["Pad"] == 1


def test_max_pool_needs_minus_inf():
    out = run_pass(FusePadIntoConv(), _pad_model("MaxPool", [0, 0, 1, 1, 0, 0, 1, 1], value=-np.inf))
    assert ops(out) == {"MaxPool": 1}
    m = _pad_model("MaxPool", [0, 0, 1, 1, 0, 0, 1, 1])
    _, rep = optimize(m, [FusePadIntoConv()], fixed_point=False)
    assert not rep.passes[0].modified and "-inf" in rep.passes[0].skipped[0]["reason"]


@pytest.mark.parametrize("case", ["reflect", "value", "channel", "negative", "auto_pad"])
def test_not_fused(case):
    pads = [0, 0, 1, 1, 0, 0, 1, 1]
    kw = {}
    if case == "reflect":
        kw["mode"] = "reflect"
    elif case == "value":
        kw["value"] = 1.0
    elif case == "channel":
        pads = [0, 1, 1, 1, 0, 0, 1, 1]
    elif case == "negative":
        pads = [0, 0, -1, 1, 0, 0, 1, 1]
    else:
        kw["auto_pad"] = "SAME_UPPER"
    if case == "channel":  # the padded channel needs a matching weight
        r = rng(3)
        m = model(
            [helper.make_node("Pad", ["x", "p"], ["xp"]), helper.make_node("Conv", ["xp", "W"], ["y"])],
            [("x", X)],
            [("y", None)],
            [init("p", np.asarray(pads, np.int64)), init("W", r.standard_normal((4, 4, 3, 3)).astype(np.float32))],
        )
    else:
        m = _pad_model("Conv", pads, **kw)
    out = run_pass(FusePadIntoConv(), m, expect_modified=False)
    assert ops(out)["Pad"] == 1
