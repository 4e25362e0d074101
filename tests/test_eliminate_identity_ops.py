"""eliminate_identity_ops: tiny graphs -> checker -> pass -> structure -> ORT parity -> idempotence."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest

from onnxslim.pipeline import optimize
from onnxslim.registry import get_pass
from onnxslim.testing import check_pass_contract

from _graphs import parse_checked as _model

Pass = get_pass("eliminate_identity_ops")
RNG = np.random.default_rng(0)


def _feeds(model: onnx.ModelProto) -> list[dict[str, np.ndarray]]:
    feeds = {}
    for vi in model.graph.input:
        tt = vi.type.tensor_type
        shape = [d.dim_value for d in tt.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if dtype == np.bool_:
            feeds[vi.name] = np.array(True)
        else:
            feeds[vi.name] = RNG.standard_normal(shape).astype(dtype)
    return [feeds]


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def _record(model, **options):
    _, report = optimize(model, [Pass(**options)], fixed_point=False, on_pass_error="raise")
    return report.passes[0]


def test_removes_every_kind_of_noop():
    m = _model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2,3] x) => (float[2,3] y) <
        float[2] shp = {2, 3}, int64[2] shape = {2, 3}, int64[1] st = {0}, int64[1] en = {9223372036854775807},
        int64[1] ax = {1}, int64[4] pads = {0, 0, 0, 0}, int64[2] eshape = {1, 3}, float[3] ones = {1, 1, 1},
        float[1,3] zeros = {0, 0, 0}, float one = {1}, float[3] negz = {-0.0, -0.0, -0.0}>
    {
        a = Identity(x)
        b = Cast<to = 1>(a)
        c = Reshape(b, shape)
        d = Transpose<perm = [0, 1]>(c)
        e = Slice(d, st, en, ax)
        f = Pad(e, pads)
        h = Expand(f, eshape)
        i = Concat<axis = 0>(h)
        j = Mul(ones, i)
        k = Div(j, one)
        l = Add(k, zeros)
        n = Sub(l, zeros)
        o = Dropout(n)
        p = Add(o, negz)
        y = Relu(p)
    }
    """)
    out = check_pass_contract(Pass(), m, _feeds(m), expect_modified=True)
    assert _ops(out) == ["Relu"]
    assert out.graph.node[0].input == ["x"]
    stats = _record(m).stats
    assert stats["nodes_removed"] == 14
    for op in (
        "Identity",
        "Cast",
        "Reshape",
        "Transpose",
        "Slice",
        "Pad",
        "Expand",
        "Concat",
        "Mul",
        "Div",
        "Sub",
        "Dropout",
    ):
        assert stats[f"{op}_removed"] == 1, op
    assert stats["Add_removed"] == 2


def test_noop_feeding_a_graph_output_keeps_the_output_name():
    m = _model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2,3] x) => (float[2,3] y, float[2,3] z) {
        r = Relu(x)
        y = Identity(r)
        t = Identity(r)
        z = Neg(t)
    }
    """)
    out = check_pass_contract(Pass(), m, _feeds(m), expect_modified=True)
    assert _ops(out) == ["Relu", "Neg"]
    assert [o.name for o in out.graph.output] == ["y", "z"]
    assert out.graph.node[0].output == ["y"] and out.graph.node[1].input == ["y"]


def test_identity_from_graph_input_to_graph_output_is_kept():
    m = _model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2,3] x) => (float[2,3] y) { y = Identity(x) }
    """)
    out = check_pass_contract(Pass(), m, _feeds(m), expect_modified=False)
    assert _ops(out) == ["Identity"]
    assert _record(m).skipped and "graph input" in _record(m).skipped[0]["reason"]


@pytest.mark.parametrize(
    "body, out_type",
    [
        ("y = Cast<to = 11>(x)", "double[3]"),  # float -> double changes the dtype
        ("y = Mul(x, ones23)", "float[2,3]"),  # broadcasting the [3] input to [2,3]
        ("y = Mul(x, twos)", "float[3]"),  # not a unit
        ("y = Sub(zeros, x)", "float[3]"),  # 0 - x is a negation
        ("y = Reshape(x, s31)", "float[3,1]"),  # a real reshape
        ("y = Expand(x, s23)", "float[2,3]"),  # a real broadcast
    ],
)
def test_real_ops_are_kept(body, out_type):
    m = _model(f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[3] x0) => ({out_type} y) <float[2,3] ones23 = {{1, 1, 1, 1, 1, 1}}, float[3] twos = {{2, 2, 2}},
                              float[3] zeros = {{0, 0, 0}}, int64[2] s31 = {{3, 1}}, int64[2] s23 = {{2, 3}}> {{
        x = Relu(x0)
        {body}
    }}
    """)
    m = onnx.shape_inference.infer_shapes(m)
    out = check_pass_contract(Pass(), m, _feeds(m), expect_modified=False)
    assert len(out.graph.node) == 2


def test_dropout_in_training_mode_or_with_used_mask_is_kept():
    m = _model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2,3] x) => (float[2,3] y, bool[2,3] mask, float[2,3] z) <float r = {0.0}, bool train = {1}> {
        y, mask = Dropout(x, r)
        z = Dropout(x, r, train)
    }
    """)
    check_pass_contract(Pass(), m, _feeds(m), expect_modified=False)


def test_signed_zero_option_keeps_add_of_positive_zero():
    m = _model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[3] x) => (float[3] y) <float[3] z = {0, 0, 0}> { a = Add(x, z)  y = Neg(a) }
    """)
    check_pass_contract(Pass(ignore_zero_sign=False), m, _feeds(m), expect_modified=False)
    out = check_pass_contract(Pass(), m, _feeds(m), expect_modified=True)
    assert _ops(out) == ["Neg"]


def test_works_in_subgraphs_and_keeps_loop_carried_identity():
    m = _model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (bool c, float[3] x) => (float[3] y, float[3] w) <int64 n = {2}> {
        y = If(c) <
            then_branch = t () => (float[3] ty) { tr = Relu(x)  ty = Identity(tr) },
            else_branch = e () => (float[3] ey) { ei = Identity(x)  ey = Neg(ei) }
        >
        w = Loop(n, c, x) <body = b (int64 i, bool ci, float[3] h) => (bool co, float[3] ho) {
            co = Identity(ci)
            hi = Identity(h)
            ho = Add(hi, h)
        }>
    }
    """)
    out = check_pass_contract(Pass(), m, _feeds(m), expect_modified=True)
    if_node, loop = out.graph.node
    then_b = next(a.g for a in if_node.attribute if a.name == "then_branch")
    else_b = next(a.g for a in if_node.attribute if a.name == "else_branch")
    body = next(a.g for a in loop.attribute if a.name == "body")
    assert [n.op_type for n in then_b.node] == ["Relu"] and then_b.output[0].name == "ty"
    assert [n.op_type for n in else_b.node] == ["Neg"] and list(else_b.node[0].input) == ["x"]
    # cond_out = Identity(cond_in): the input is a body input, so the node stays.
    assert [n.op_type for n in body.node] == ["Identity", "Add"]
    assert _record(m).stats["nodes_removed"] == 3


def test_reshape_with_copied_and_inferred_dims_on_symbolic_batch():
    m = _model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N,4] x) => (float[N,4] y) <int64[2] s = {0, 4}, int64[2] s2 = {-1, 4}, int64[2] s3 = {0, -1}> {
        a = Reshape(x, s)
        b = Reshape(a, s2)
        c = Reshape(b, s3)
        y = Relu(c)
    }
    """)
    m = onnx.shape_inference.infer_shapes(m)
    feeds = [{"x": RNG.standard_normal((5, 4)).astype(np.float32)}]
    out = check_pass_contract(Pass(), m, feeds, expect_modified=True)
    # [0,4] copies dims and [0,-1] infers the last from a known dim; [-1,4] would need N known.
    assert _ops(out) == ["Reshape", "Relu"]
