"""fold_shape_computations: static dims fold to constants, dynamic dims stay dynamic."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxslim.passes.slim.fold_shape_computations import FoldShapeComputations
from onnxslim.testing import check_pass_contract

from _graphs import op_types as _ops
from _graphs import optimize_sample_model
from _graphs import parse_checked as _model
from conftest import MODEL_IDS, MODELS


def test_static_chain_folds_dynamic_batch_chain_stays():
    # x is [batch, 4, 6]. Reshape target 1 uses only static dims (4*6 -> folded); target 2 needs batch.
    m = _model(
        """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[batch,4,6] x) => (float[batch,24] y, float[batch,4,6] z) {
      s = Shape(x)
      i1 = Constant<value = int64 {1}>()
      i2 = Constant<value = int64 {2}>()
      i0 = Constant<value = int64 {0}>()
      ax = Constant<value = int64[1] {0}>()
      d1 = Gather(s, i1)
      d2 = Gather(s, i2)
      p = Mul(d1, d2)
      pu = Unsqueeze(p, ax)
      m1 = Constant<value = int64[1] {-1}>()
      shp = Concat<axis = 0>(m1, pu)
      y = Reshape(x, shp)
      d0 = Gather(s, i0)
      b = Unsqueeze(d0, ax)
      shp2 = Concat<axis = 0>(b, s2)
      s2 = Slice(s, st, en)
      st = Constant<value = int64[1] {1}>()
      en = Constant<value = int64[1] {3}>()
      z = Reshape(x, shp2)
    }""".replace(
            "      shp2 = Concat<axis = 0>(b, s2)\n      s2 = Slice(s, st, en)\n      st = Constant<value = int64[1] {1}>()\n      en = Constant<value = int64[1] {3}>()\n",
            "      st = Constant<value = int64[1] {1}>()\n      en = Constant<value = int64[1] {3}>()\n      s2 = Slice(s, st, en)\n      shp2 = Concat<axis = 0>(b, s2)\n",
        )
    )
    feeds = [{"x": np.random.default_rng(0).standard_normal((b, 4, 6)).astype(np.float32)} for b in (1, 3)]
    out = check_pass_contract(FoldShapeComputations(), m, feeds, expect_modified=True)
    ops = _ops(out)
    assert "Mul" not in ops  # 4*6 folded
    assert ops.count("Shape") == 1  # the batch chain still reads Shape(x)
    assert ops.count("Gather") == 1  # only Gather(s, 0) (batch) is left
    assert "Slice" not in ops  # Slice(s, 1, 3) = [4, 6] folded
    y_shape = next(n for n in out.graph.node if n.output[0] == "y").input[1]
    init = {t.name: onnx.numpy_helper.to_array(t) for t in out.graph.initializer}
    assert init[y_shape].tolist() == [-1, 24]
    # dim names of the graph I/O are kept
    assert out.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_shape_start_end_and_size():
    m = _model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[n,3,5] x) => (int64[2] s, int64 z, int64 k) {
      s = Shape<start = -2>(x)
      z = Size(x)
      c = Constant<value = float[2,7] {1,2,3,4,5,6,7,8,9,10,11,12,13,14}>()
      k = Size(c)
    }""")
    feeds = [{"x": np.zeros((2, 3, 5), np.float32)}]
    out = check_pass_contract(FoldShapeComputations(), m, feeds, expect_modified=True)
    ops = _ops(out)
    assert ops.count("Size") == 1  # Size(x) depends on n: stays
    assert "Shape" not in ops


def test_fully_dynamic_model_unchanged():
    m = _model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[a,b] x) => (int64[2] s) {
      s = Shape(x)
    }""")
    check_pass_contract(FoldShapeComputations(), m, [{"x": np.zeros((2, 3), np.float32)}], expect_modified=False)


def test_loop_carried_shape_is_not_trusted():
    # acc grows every iteration: its inferred body shape is not evidence, Shape(acc) must stay.
    m = _model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1] x) => (float[N] y, int64[K,1] s) {
      n = Constant<value = int64 {3}>()
      go = Constant<value = bool {1}>()
      y, s = Loop(n, go, x) <body = body (int64 i, bool cin, float[1] acc) => (bool cout, float[M] accout, int64[1] sz) {
        cout = Identity(cin)
        sz = Shape(acc)
        accout = Concat<axis = 0>(acc, acc)
      }>
    }""")
    feeds = [{"x": np.ones(1, np.float32)}]
    out = check_pass_contract(FoldShapeComputations(), m, feeds)
    assert "Shape" in _ops(out)


@pytest.mark.parametrize("entry", MODELS, ids=MODEL_IDS)
def test_sample_models(entry):
    optimize_sample_model(entry, ["fold_constants", "fold_shape_computations"])


def test_folds_inside_if_branch_reading_outer_tensor():
    m = _model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[batch,6] x, bool c) => (float[batch,2,3] y) {
      y = If(c) <then_branch = a () => (float[batch,2,3] o1) {
                    s = Shape(x)
                    i = Constant<value = int64[1] {0}>()
                    b = Gather(s, i)
                    t = Constant<value = int64[2] {2, 3}>()
                    shp = Concat<axis = 0>(b, t)
                    o1 = Reshape(x, shp) },
                 else_branch = e () => (float[batch,2,3] o2) {
                    s2 = Shape<start = 1>(x)
                    k = Constant<value = int64[3] {-1, 2, 3}>()
                    six = Constant<value = int64[1] {6}>()
                    d = Sub(s2, six)
                    shp2 = Add(k, d)
                    o2 = Reshape(x, shp2) }>
    }""")
    feeds = [{"x": np.arange(12, dtype=np.float32).reshape(2, 6), "c": np.array(v)} for v in (True, False)]
    out = check_pass_contract(FoldShapeComputations(), m, feeds, expect_modified=True)
    ops = _ops(out)
    assert ops.count("Shape") == 1 and "Sub" not in ops and "Add" not in ops
