"""inline_constant_if: constant-condition If replaced by its taken branch, also inside a Loop body."""

from __future__ import annotations

import numpy as np
import pytest

from onnxslim.passes.slim.inline_constant_if import InlineConstantIf
from onnxslim.pipeline import optimize
from onnxslim.testing import check_pass_contract

from _graphs import op_types as _ops
from _graphs import optimize_sample_model
from _graphs import parse_checked as _model
from conftest import MODEL_IDS, MODELS


@pytest.mark.parametrize("cond,kept", [(1, "Mul"), (0, "Sqrt")])
def test_inlines_taken_branch(cond, kept):
    # Both Ifs' branches name an inner tensor 't': once inlined into one scope, one must be renamed.
    m = _model(f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[3] x) => (float[3] y, float[3] r2) {{
      c = Constant<value = bool {{{cond}}}>()
      r = If(c) <then_branch = a () => (float[3] o1) {{ t = Mul(x, x)  o1 = Add(t, x) }},
                 else_branch = b () => (float[3] o2) {{ t = Sub(x, x)  o2 = Neg(t) }}>
      y = Relu(r)
      r2 = If(c) <then_branch = a2 () => (float[3] o3) {{ t = Abs(x)  o3 = Add(t, x) }},
                  else_branch = b2 () => (float[3] o4) {{ t = Sqrt(x)  o4 = Neg(t) }}>
    }}""")
    feeds = [{"x": np.array([1, 2, 3], np.float32)}]
    out = check_pass_contract(InlineConstantIf(), m, feeds, expect_modified=True)
    ops = _ops(out)
    assert "If" not in ops and kept in ops
    names = [o for n in out.graph.node for o in n.output]
    assert len(names) == len(set(names))
    _, rep = optimize(m, ["inline_constant_if"], fixed_point=False)
    assert rep.passes[0].stats["ifs_inlined"] == 2 and rep.passes[0].stats["tensors_renamed"] >= 1


def test_branch_output_is_graph_output_and_outer_tensor():
    # The taken branch returns an outer tensor straight through; the If's output is a graph output.
    m = _model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[3] x) => (float[3] y) {
      c = Constant<value = bool {1}>()
      n = Neg(x)
      y = If(c) <then_branch = a () => (float[3] o1) { o1 = Identity(n) },
                 else_branch = b () => (float[3] o2) { o2 = Abs(x) }>
    }""")
    feeds = [{"x": np.array([1, -2, 3], np.float32)}]
    out = check_pass_contract(InlineConstantIf(), m, feeds, expect_modified=True)
    assert "If" not in _ops(out)
    assert [o.name for o in out.graph.output] == ["y"]


def test_inlines_inside_loop_body_and_nested():
    m = _model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[3] x) => (float[3] y) {
      n = Constant<value = int64 {3}>()
      go = Constant<value = bool {1}>()
      y = Loop(n, go, x) <body = body (int64 i, bool cin, float[3] acc) => (bool cout, float[3] accout) {
        cout = Identity(cin)
        k = Constant<value = bool {0}>()
        accout = If(k) <then_branch = a () => (float[3] o1) { o1 = Neg(acc) },
                        else_branch = b () => (float[3] o2) {
                            k2 = Constant<value = bool {1}>()
                            o2 = If(k2) <then_branch = c () => (float[3] p1) { h = Constant<value = float[3] {0.5, 0.5, 0.5}>()  p1 = Add(acc, h) },
                                         else_branch = d () => (float[3] p2) { p2 = Identity(acc) }>
                        }>
      }>
    }""")
    feeds = [{"x": np.array([1, -2, 3], np.float32)}]
    out = check_pass_contract(InlineConstantIf(), m, feeds, expect_modified=True)
    ops = _ops(out)
    assert "If" not in ops and "Loop" in ops and "Add" in ops


def test_dynamic_condition_is_left_alone():
    m = _model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[3] x, bool c) => (float[3] y) {
      y = If(c) <then_branch = a () => (float[3] o1) { o1 = Neg(x) },
                 else_branch = b () => (float[3] o2) { o2 = Abs(x) }>
    }""")
    out = check_pass_contract(
        InlineConstantIf(), m, [{"x": np.ones(3, np.float32), "c": np.array(True)}], expect_modified=False
    )
    assert "If" in _ops(out)


@pytest.mark.parametrize("entry", MODELS, ids=MODEL_IDS)
def test_sample_models(entry):
    optimize_sample_model(entry, ["fold_constants", "inline_constant_if"])
