"""eliminate_common_subexpressions: tiny graphs -> checker -> pass -> structure -> ORT parity -> idempotence."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser

from onnxslim.pipeline import optimize
from onnxslim.registry import get_pass
from onnxslim.testing import check_pass_contract

from _graphs import parse_checked as _model

Pass = get_pass("eliminate_common_subexpressions")
RNG = np.random.default_rng(0)


def _ops(graph: onnx.GraphProto) -> list[str]:
    return [n.op_type for n in graph.node]


def _x(*shape) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def _record(model, **options):
    _, report = optimize(model, [Pass(**options)], fixed_point=False, on_pass_error="raise")
    return report.passes[0]


def test_merges_duplicate_chains_and_equal_constants():
    m = _model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2,3] x) => (float[2,3] y) <float[3] c1 = {1, 2, 3}, float[3] c2 = {1, 2, 3}> {
        a1 = Relu(x)
        a2 = Relu(x)
        b1 = Add(a1, c1)
        b2 = Add(a2, c2)
        k1 = Constant<value = float[3] {4, 5, 6}>()
        k2 = Constant<value = float[3] {4, 5, 6}>()
        d1 = Mul(b1, k1)
        d2 = Mul(b2, k2)
        y = Sub(d1, d2)
    }
    """)
    out = check_pass_contract(Pass(), m, [{"x": _x(2, 3)}], expect_modified=True)
    assert sorted(_ops(out.graph)) == sorted(["Relu", "Add", "Constant", "Mul", "Sub"])
    sub = out.graph.node[-1]
    assert sub.input[0] == sub.input[1]
    assert _record(m).stats["nodes_merged"] == 4


def test_keeps_nodes_that_differ():
    m = _model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2,3] x) => (float[2,3] y) <float[3] c1 = {1, 2, 3}, double[3] c2 = {1, 2, 3}, float[3] c3 = {1, 2, 4},
                                        float[3] z1 = {0, 0, 0}, float[3] z2 = {-0.0, 0, 0}> {
        a = Add(x, c1)
        b = Add(x, c3)
        e = Add(x, z1)
        f = Add(x, z2)
        l1 = LeakyRelu<alpha = 0.0>(x)
        l2 = LeakyRelu<alpha = -0.0>(x)
        l3 = LeakyRelu(x)
        cd1 = Cast<to = 1>(c2)
        s = Sum(a, b, e, f, l1, l2, l3, cd1)
        y = Identity(s)
    }
    """)
    check_pass_contract(Pass(), m, [{"x": _x(2, 3)}], expect_modified=False)


def test_never_merges_two_graph_outputs_and_keeps_the_one_that_is():
    m = _model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2,3] x) => (float[2,3] y1, float[2,3] y2, float[2,3] z) {
        y1 = Relu(x)
        y2 = Relu(x)
        n1 = Neg(x)
        t = Abs(n1)
        z = Neg(x)
    }
    """)
    out = check_pass_contract(Pass(), m, [{"x": _x(2, 3)}], expect_modified=True)
    assert [o.name for o in out.graph.output] == ["y1", "y2", "z"]
    assert _ops(out.graph).count("Relu") == 2 and _ops(out.graph).count("Neg") == 1
    rec = _record(m)
    assert rec.stats["nodes_merged"] == 1
    assert any("graph outputs" in s["reason"] for s in rec.skipped)


def test_random_ops_are_not_merged():
    m = _model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2,3] x) => (float[2,3] y) {
        r1 = RandomUniformLike(x)
        r2 = RandomUniformLike(x)
        y = Sub(r1, r2)
    }
    """)
    out, report = optimize(m, [Pass()], fixed_point=False, on_pass_error="raise")
    assert not report.passes[0].modified
    assert _ops(out.graph).count("RandomUniformLike") == 2


def test_merges_inside_a_loop_body_and_reads_outer_values():
    m = _model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[3] x, bool c) => (float[3] w) <int64 n = {3}> {
        o1 = Abs(x)
        o2 = Abs(x)
        w = Loop(n, c, x) <body = b (int64 i, bool ci, float[3] h) => (bool co, float[3] ho) {
            co = Identity(ci)
            m1 = Mul(h, o1)
            m2 = Mul(h, o2)
            ho = Add(m1, m2)
        }>
    }
    """)
    out = check_pass_contract(Pass(), m, [{"x": _x(3), "c": np.array(True)}], expect_modified=True)
    assert _ops(out.graph) == ["Abs", "Loop"]
    body = out.graph.node[1].attribute[0].g
    assert _ops(body) == ["Identity", "Mul", "Add"]
    add = body.node[-1]
    assert add.input[0] == add.input[1]
    assert _record(m).stats["nodes_merged"] == 2


def test_nodes_with_subgraphs_are_not_merged():
    m = _model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[3] x, bool c) => (float[3] y) {
        a = If(c) < then_branch = t () => (float[3] ty) { ty = Relu(x) },
                    else_branch = e () => (float[3] ey) { ey = Neg(x) } >
        b = If(c) < then_branch = t2 () => (float[3] ty2) { ty2 = Relu(x) },
                    else_branch = e2 () => (float[3] ey2) { ey2 = Neg(x) } >
        y = Add(a, b)
    }
    """)
    check_pass_contract(Pass(), m, [{"x": _x(3), "c": np.array(False)}], expect_modified=False)
