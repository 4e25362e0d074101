from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from onnxslim.passes.slim.fuse_matmul_add_into_gemm import FuseMatmulAddIntoGemm
from onnxslim.pipeline import optimize

from _fusion_testlib import init, model, ops, rng, run_pass


@pytest.mark.parametrize("cshape", [(4,), (1, 4), (3, 4), ()])
@pytest.mark.parametrize("swap", [False, True])
def test_2d_matmul_add_becomes_gemm(cshape, swap):
    r = rng(1)
    inits = [
        init("B", r.standard_normal((5, 4)).astype(np.float32)),
        init("C", r.standard_normal(cshape).astype(np.float32)),
    ]
    add_in = ["C", "mm"] if swap else ["mm", "C"]
    m = model(
        [helper.make_node("MatMul", ["x", "B"], ["mm"]), helper.make_node("Add", add_in, ["y"])],
        [("x", [3, 5])],
        [("y", None)],
        inits,
    )
    out = run_pass(FuseMatmulAddIntoGemm(), m)
    assert ops(out) == {"Gemm": 1}


def test_rank_derived_through_elementwise_ops_without_shapes():
    # No value_info for 'z'; its rank comes from Sub(x [N,5], mean [5]).
    r = rng(2)
    inits = [
        init("mean", r.standard_normal(5).astype(np.float32)),
        init("B", r.standard_normal((5, 4)).astype(np.float32)),
        init("C", r.standard_normal(4).astype(np.float32)),
    ]
    m = model(
        [
            helper.make_node("Sub", ["x", "mean"], ["z"]),
            helper.make_node("MatMul", ["z", "B"], ["mm"]),
            helper.make_node("Add", ["mm", "C"], ["y"]),
        ],
        [("x", ["n", 5])],
        [("y", None)],
        inits,
    )
    out = run_pass(FuseMatmulAddIntoGemm(), m)
    assert ops(out) == {"Sub": 1, "Gemm": 1}


def test_3d_matmul_not_fused():
    r = rng(3)
    inits = [
        init("B", r.standard_normal((5, 4)).astype(np.float32)),
        init("C", r.standard_normal(4).astype(np.float32)),
    ]
    m = model(
        [helper.make_node("MatMul", ["x", "B"], ["mm"]), helper.make_node("Add", ["mm", "C"], ["y"])],
        [("x", [2, 3, 5])],
        [("y", None)],
        inits,
    )
    out = run_pass(FuseMatmulAddIntoGemm(), m, expect_modified=False)
    assert ops(out) == {"MatMul": 1, "Add": 1}
    _, rep = optimize(m, [FuseMatmulAddIntoGemm()], fixed_point=False)
    assert "2-D" in rep.passes[0].skipped[0]["reason"]


@pytest.mark.parametrize("cshape", [(2, 4), (3, 1, 4)])
def test_add_that_grows_the_output_not_fused(cshape):
    r = rng(4)
    inits = [
        init("B", r.standard_normal((5, 4)).astype(np.float32)),
        init("C", r.standard_normal(cshape).astype(np.float32)),
    ]
    m = model(
        [helper.make_node("MatMul", ["x", "B"], ["mm"]), helper.make_node("Add", ["mm", "C"], ["y"])],
        [("x", [1, 5])],
        [("y", None)],
        inits,
    )
    out = run_pass(FuseMatmulAddIntoGemm(), m, expect_modified=False)
    assert ops(out)["Gemm"] == 0


def test_fused_inside_if_branch_with_constant_nodes():
    r = rng(5)
    b = helper.make_node("Constant", [], ["B"], value=init("Bv", r.standard_normal((5, 4)).astype(np.float32)))
    c = helper.make_node("Constant", [], ["C"], value=init("Cv", r.standard_normal(4).astype(np.float32)))
    then_g = helper.make_graph(
        [b, c, helper.make_node("MatMul", ["x", "B"], ["mm"]), helper.make_node("Add", ["mm", "C"], ["t"])],
        "then",
        [],
        [helper.make_tensor_value_info("t", 1, ["n", 4])],
    )
    else_g = helper.make_graph(
        [helper.make_node("Slice", ["x", "s0", "s1", "s2"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", 1, ["n", 4])],
    )
    m = model(
        [helper.make_node("If", ["flag"], ["y"], then_branch=then_g, else_branch=else_g)],
        [("x", ["n", 5]), helper.make_tensor_value_info("flag", 9, [])],
        [("y", ["n", 4])],
        [init("s0", np.array([0], np.int64)), init("s1", np.array([4], np.int64)), init("s2", np.array([1], np.int64))],
    )  # else: columns 0:4
    feeds = [{"x": r.standard_normal((3, 5)).astype(np.float32), "flag": np.array(f)} for f in (True, False)]
    out = run_pass(FuseMatmulAddIntoGemm(), m, feeds=feeds)
    assert ops(out)["Gemm"] == 1 and ops(out)["MatMul"] == 0 and ops(out)["Constant"] == 2
