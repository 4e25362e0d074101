from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from onnxslim.passes.slim.collapse_reshape_chains import CollapseReshapeChains
from onnxslim.pipeline import optimize

from _fusion_testlib import init, model, ops, run_pass


def _i64(v):
    return np.asarray(v, np.int64)


@pytest.mark.parametrize("s1,s2", [([6, 4], [2, 12]), ([0, 12], [-1, 3]), ([2, -1], [0, 3, -1]), ([0, 3, 4], [0, -1])])
def test_reshape_reshape(s1, s2):
    m = model(
        [helper.make_node("Reshape", ["x", "s1"], ["r"]), helper.make_node("Reshape", ["r", "s2"], ["y"])],
        [("x", [2, 3, 4])],
        [("y", None)],
        [init("s1", _i64(s1)), init("s2", _i64(s2))],
    )
    out = run_pass(CollapseReshapeChains(), m)
    assert ops(out) == {"Reshape": 1}


def test_reshape_zero_from_unknown_intermediate_is_skipped():
    # 0 in the second shape copies a dim produced by -1 in the first: unknown without shapes.
    m = model(
        [helper.make_node("Reshape", ["x", "s1"], ["r"]), helper.make_node("Reshape", ["r", "s2"], ["y"])],
        [("x", ["n", 3, 4])],
        [("y", None)],
        [init("s1", _i64([-1, 4])), init("s2", _i64([0, 2, 2]))],
    )
    out = run_pass(CollapseReshapeChains(), m, expect_modified=False, feeds=[{"x": np.ones((2, 3, 4), np.float32)}])
    assert ops(out) == {"Reshape": 2}


def test_flatten_chains():
    m = model(
        [
            helper.make_node("Flatten", ["x"], ["f"], axis=2),
            helper.make_node("Flatten", ["f"], ["g"], axis=1),
            helper.make_node("Relu", ["g"], ["y"]),
        ],
        [("x", [2, 3, 4])],
        [("y", None)],
    )
    out = run_pass(CollapseReshapeChains(), m)
    assert ops(out) == {"Flatten": 1, "Relu": 1}
    # Reshape then Flatten with a static intermediate → one Reshape
    m = model(
        [helper.make_node("Reshape", ["x", "s"], ["r"]), helper.make_node("Flatten", ["r"], ["y"], axis=1)],
        [("x", ["n", 3, 4])],
        [("y", None)],
        [init("s", _i64([0, 2, 6]))],
        value_info=[("r", ["n", 2, 6])],
    )
    out = run_pass(CollapseReshapeChains(), m, feeds=[{"x": np.arange(48, dtype=np.float32).reshape(2, 6, 4)[:, :3]}])
    assert ops(out) == {"Reshape": 1}


def test_transpose_pairs():
    t1 = helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 3, 1])
    m = model(
        [t1, helper.make_node("Transpose", ["t"], ["u"], perm=[0, 3, 1, 2]), helper.make_node("Relu", ["u"], ["y"])],
        [("x", [1, 2, 3, 4])],
        [("y", None)],
    )
    out = run_pass(CollapseReshapeChains(), m)
    assert ops(out) == {"Relu": 1}  # identity: both gone
    m = model(
        [t1, helper.make_node("Transpose", ["t"], ["y"], perm=[1, 0, 2, 3])], [("x", [1, 2, 3, 4])], [("y", None)]
    )
    out = run_pass(CollapseReshapeChains(), m)
    assert ops(out) == {"Transpose": 1}
    # identity pair feeding a graph output: one Identity keeps the output name
    m = model(
        [t1, helper.make_node("Transpose", ["t"], ["y"], perm=[0, 3, 1, 2])], [("x", [1, 2, 3, 4])], [("y", None)]
    )
    out = run_pass(CollapseReshapeChains(), m)
    assert ops(out) == {"Identity": 1}


def test_transpose_with_other_reader_is_skipped():
    m = model(
        [
            helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0]),
            helper.make_node("Transpose", ["t"], ["y"], perm=[1, 0]),
            helper.make_node("Relu", ["t"], ["z"]),
        ],
        [("x", [2, 3])],
        [("y", None), ("z", None)],
    )
    out = run_pass(CollapseReshapeChains(), m, expect_modified=False)
    assert ops(out)["Transpose"] == 2


@pytest.mark.parametrize("opset", [11, 13])
@pytest.mark.parametrize("first", ["Squeeze", "Unsqueeze"])
def test_squeeze_unsqueeze_cancel(opset, first):
    second = "Unsqueeze" if first == "Squeeze" else "Squeeze"
    shape = [2, 1, 3] if first == "Squeeze" else [2, 3]
    axes, inits = [1], []
    if opset >= 13:
        inits = [init("ax", _i64(axes))]
        n1 = helper.make_node(first, ["x", "ax"], ["a"])
        n2 = helper.make_node(second, ["a", "ax"], ["b"])
    else:
        n1 = helper.make_node(first, ["x"], ["a"], axes=axes)
        n2 = helper.make_node(second, ["a"], ["b"], axes=axes)
    m = model([n1, n2, helper.make_node("Relu", ["b"], ["y"])], [("x", shape)], [("y", None)], inits, opset=opset)
    out = run_pass(CollapseReshapeChains(), m)
    assert ops(out) == {"Relu": 1}


def test_squeeze_unsqueeze_different_axes_kept():
    m = model(
        [helper.make_node("Squeeze", ["x"], ["a"], axes=[1]), helper.make_node("Unsqueeze", ["a"], ["y"], axes=[0])],
        [("x", [2, 1, 3])],
        [("y", None)],
        opset=11,
    )
    _, rep = optimize(m, [CollapseReshapeChains()], fixed_point=False)
    assert not rep.passes[0].modified and "do not cancel" in rep.passes[0].skipped[0]["reason"]


def test_inside_loop_body():
    body = helper.make_graph(
        [
            helper.make_node("Transpose", ["h"], ["t"], perm=[1, 0]),
            helper.make_node("Transpose", ["t"], ["u"], perm=[1, 0]),
            helper.make_node("Relu", ["u"], ["h_out"]),
            helper.make_node("Identity", ["c"], ["c_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", 7, []),
            helper.make_tensor_value_info("c", 9, []),
            helper.make_tensor_value_info("h", 1, [2, 3]),
        ],
        [helper.make_tensor_value_info("c_out", 9, []), helper.make_tensor_value_info("h_out", 1, [2, 3])],
    )
    m = model(
        [helper.make_node("Loop", ["n", "", "x"], ["y"], body=body)],
        [("x", [2, 3])],
        [("y", [2, 3])],
        [init("n", np.array(2, np.int64))],
    )
    out = run_pass(CollapseReshapeChains(), m)
    assert ops(out)["Transpose"] == 0


@pytest.mark.parametrize("opset", [11, 13])
@pytest.mark.parametrize(
    "op,shape,a1,a2",
    [
        ("Unsqueeze", [2, 3], [0], [2]),
        ("Unsqueeze", [2, 3], [1], [0, 3]),
        ("Squeeze", [1, 2, 1, 3], [0], [1]),
        ("Squeeze", [2, 1, 1, 3, 1], [1, 4], [1]),
    ],
)
def test_same_squeezes_merge(opset, op, shape, a1, a2):
    if opset >= 13:
        inits = [init("a1", _i64(a1)), init("a2", _i64(a2))]
        nodes = [helper.make_node(op, ["x", "a1"], ["a"]), helper.make_node(op, ["a", "a2"], ["y"])]
    else:
        inits = []
        nodes = [helper.make_node(op, ["x"], ["a"], axes=a1), helper.make_node(op, ["a"], ["y"], axes=a2)]
    m = model(nodes, [("x", shape)], [("y", None)], inits, opset=opset)
    out = run_pass(CollapseReshapeChains(), m)
    assert ops(out) == {op: 1}
    assert [d.dim_value for d in out.graph.output[0].type.tensor_type.shape.dim] == [
        d.dim_value for d in m.graph.output[0].type.tensor_type.shape.dim
    ]
