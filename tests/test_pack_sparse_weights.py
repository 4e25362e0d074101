"""pack_sparse_weights: bitmask + values storage that decodes to exactly the pruned dense weights."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from onnxslim.passes.prune.pack_sparse_weights import PackSparseWeights, pack_bitmask, packed_nbytes, unpack_bitmask
from onnxslim.pipeline import optimize
from onnxslim.testing import check_pass_contract, run_model

from _fusion_testlib import model


def _sparse(shape, sparsity, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape)
    w[rng.random(shape) < sparsity] = 0
    return w.astype(dtype)


@pytest.mark.parametrize("shape", [(1000,), (7, 13), (16, 8, 3, 3), (1,)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int8])
def test_bitmask_roundtrip_is_exact(shape, dtype):
    w = _sparse(shape, 0.6, dtype)
    mask, values = pack_bitmask(w)
    assert mask.dtype == np.uint8 and mask.shape == ((w.size + 7) // 8, 1)
    assert values[0] == 0 and values.size == np.count_nonzero(w) + 1
    np.testing.assert_array_equal(unpack_bitmask(mask, values, w.shape), w)


def _matmul_model(w, opset=17, constant_node=False):
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"])]
    inits = [numpy_helper.from_array(w, "W")]
    if constant_node:
        nodes.insert(0, helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(w, "w")))
        inits = []
    return model(nodes, [("x", [2, w.shape[0]])], [("y", [2, w.shape[1]])], inits, opset=opset)


def _session_run(m, feed, level):
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feed)[0]


@pytest.mark.parametrize("opset", [11, 13, 17])
@pytest.mark.parametrize("constant_node", [False, True])
def test_packed_model_computes_exactly_the_same_and_is_smaller(opset, constant_node):
    w = _sparse((125, 40), 0.5)  # 5000 elements: not a multiple of 8 bits per byte
    m = _matmul_model(w, opset, constant_node)
    out, report = optimize(m, [PackSparseWeights()], fixed_point=False, on_pass_error="raise")
    onnx.checker.check_model(out, full_check=True)
    ops = {n.op_type for n in out.graph.node}
    assert {"BitShift", "CumSum", "Gather"} <= ops and "Constant" not in ops
    record = report.passes[0]
    nnz = int(np.count_nonzero(w))
    assert record.layers[0]["stored_bytes"] == packed_nbytes(w.size, nnz, 4) == 625 + 4 * (nnz + 1)
    assert out.ByteSize() < 0.6 * m.ByteSize()
    feed = {"x": np.random.default_rng(1).standard_normal((2, 125)).astype(np.float32)}
    ref = run_model(m, feed)[0]
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        np.testing.assert_array_equal(_session_run(out, feed, level), ref)
    # the output tensor of the chain keeps the constant's name
    assert any(o == "W" for n in out.graph.node for o in n.output)


def test_int8_weight_behind_dequantize_linear_is_packed_and_still_fuses():
    w = _sparse((64, 32), 0.5, np.int8)
    nodes = [
        helper.make_node("DequantizeLinear", ["Wq", "s", "z"], ["W"]),
        helper.make_node("MatMul", ["x", "W"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(w, "Wq"),
        numpy_helper.from_array(np.array(0.02, np.float32), "s"),
        numpy_helper.from_array(np.array(0, np.int8), "z"),
    ]
    m = model(nodes, [("x", [2, 64])], [("y", [2, 32])], inits)
    out, report = optimize(m, [PackSparseWeights(min_elements=16)], fixed_point=False, on_pass_error="raise")
    assert report.passes[0].stats["constants_packed"] == 1
    feed = {"x": np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)}
    np.testing.assert_array_equal(run_model(out, feed)[0], run_model(m, feed)[0])


def test_dense_or_small_constants_are_left_alone():
    dense = _matmul_model(np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32))
    out, report = optimize(dense, [PackSparseWeights()], fixed_point=False)
    assert not report.passes[0].modified
    small = _matmul_model(_sparse((16, 16), 0.9))
    assert not optimize(small, [PackSparseWeights()], fixed_point=False)[1].passes[0].modified


def test_opset_10_is_left_alone_with_a_note():
    w = _sparse((64, 64), 0.9)
    m = _matmul_model(w, opset=10)
    _, report = optimize(m, [PackSparseWeights()], fixed_point=False)
    assert not report.passes[0].modified and "opset 10 < 11" in report.passes[0].notes[0]


def test_contract():
    check_pass_contract(
        PackSparseWeights(),
        _matmul_model(_sparse((128, 64), 0.5)),
        [{"x": np.random.default_rng(2).standard_normal((2, 128)).astype(np.float32)}],
        expect_modified=True,
    )
