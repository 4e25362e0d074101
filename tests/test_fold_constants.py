"""fold_constants: tiny graphs (structure, parity, idempotence, edge cases) and every sample model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxslim.passes.slim.fold_constants import FoldConstants
from onnxslim.pipeline import optimize
from onnxslim.testing import check_pass_contract

from _graphs import op_types as _ops
from _graphs import optimize_sample_model
from _graphs import parse_checked as _model
from conftest import MODEL_IDS, MODELS

X = {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}


def test_folds_chain_of_constant_nodes():
    m = _model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2,3] x) => (float[2,3] y) {
      a = Constant<value = float[3] {1.0, 2.0, 3.0}>()
      b = Constant<value_float = 2.0>()
      c = Mul(a, b)
      d = Sqrt(c)
      y = Add(x, d)
    }""")
    out = check_pass_contract(FoldConstants(), m, [X], expect_modified=True)
    assert _ops(out) == ["Add"]
    _, rep = optimize(m, ["fold_constants"], fixed_point=False)
    assert rep.passes[0].stats["constant_nodes_converted"] == 2
    assert rep.passes[0].stats["nodes_folded"] == 2


def test_growth_is_skipped_by_default_and_done_when_allowed():
    m = _model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1000,1000] x) => (float[1000,1000] y) {
      s = Constant<value = int64[2] {1000, 1000}>()
      z = ConstantOfShape<value = float[1] {1.5}>(s)
      y = Add(x, z)
    }""")
    feeds = [{"x": np.ones((1000, 1000), np.float32)}]
    out, rep = optimize(m, ["fold_constants"], fixed_point=False)
    assert "ConstantOfShape" in _ops(out)
    assert any("would add" in s["reason"] for s in rep.passes[0].skipped)
    assert out.ByteSize() <= m.ByteSize()
    grown = check_pass_contract(FoldConstants(allow_growth=True), m, feeds, expect_modified=True)
    assert _ops(grown) == ["Add"]


def test_a_weight_cut_into_unequal_slices_folds_whole():
    """An exporter's gate reordering (LSTM weights: Slice the gates, Concat them back): the slices together free
    the weight they read, so each is credited its share by size, not an equal one (which refused the big slice)."""
    w = np.arange(4 * 64 * 8, dtype=np.float32).reshape(4 * 64, 8) / 100
    m = onnx.helper.make_model(
        onnx.helper.make_graph(
            [
                onnx.helper.make_node("Slice", ["W", "s0", "e0", "ax"], ["a"]),
                onnx.helper.make_node("Slice", ["W", "e0", "e1", "ax"], ["b"]),
                onnx.helper.make_node("Concat", ["b", "a"], ["w2"], axis=0),
                onnx.helper.make_node("Transpose", ["w2"], ["w2t"]),
                onnx.helper.make_node("MatMul", ["x", "w2t"], ["y"]),
            ],
            "g",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 8])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 256])],
            [
                onnx.numpy_helper.from_array(w, "W"),
                *(
                    onnx.numpy_helper.from_array(np.array([v], np.int64), n)
                    for n, v in (("s0", 0), ("e0", 64), ("e1", 256), ("ax", 0))
                ),
            ],  # fmt: skip
        ),
        opset_imports=[onnx.helper.make_opsetid("", 17)],
    )
    feeds = [{"x": np.ones((2, 8), np.float32)}]
    out = check_pass_contract(FoldConstants(), m, feeds, expect_modified=True)
    assert _ops(out) == ["MatMul"]
    assert out.ByteSize() <= m.ByteSize()


@pytest.mark.parametrize("op", ["RandomNormalLike", "RandomUniformLike"])
def test_nondeterministic_ops_are_not_folded(op):
    m = _model(f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2,3] x) => (float[2,3] y) {{
      a = Constant<value = float[2,3] {{1.0, 2.0, 3.0, 4.0, 5.0, 6.0}}>()
      r = {op}<seed = 1.0>(a)
      y = Add(x, r)
    }}""")
    out, rep = optimize(m, ["fold_constants"], fixed_point=False)
    assert op in _ops(out)
    assert any(s["op_type"] == op for s in rep.passes[0].skipped)


def test_random_normal_without_inputs_stays():
    m = _model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2,3] x) => (float[2,3] y) {
      r = RandomNormal<shape = [2, 3], seed = 2.0>()
      y = Add(x, r)
    }""")
    out, _ = optimize(m, ["fold_constants"], fixed_point=False)
    assert "RandomNormal" in _ops(out)


def test_dequantize_of_constant_weight_is_kept():
    m = _model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2,3] x) => (float[2,3] y)
    <int8[3] w = {10, -20, 30}, float s = {0.5}, int8 z = {0}>
    {
      d = DequantizeLinear(w, s, z)
      y = Add(x, d)
    }""")
    out = check_pass_contract(FoldConstants(), m, [X], expect_modified=False)
    assert "DequantizeLinear" in _ops(out)


def test_custom_domain_node_is_untouched():
    m = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17, "com.example" : 1]>
    g (float[3] x) => (float[3] y)
    <float[3] w = {1.0, 2.0, 3.0}>
    {
      c = com.example.Twice(w)
      y = Add(x, c)
    }""")
    out, rep = optimize(m, ["fold_constants"], fixed_point=False, check="none")
    assert [n.op_type for n in out.graph.node] == ["Twice", "Add"]
    assert out.graph.node[0].domain == "com.example"
    assert not rep.passes[0].modified


def test_folds_inside_subgraphs_with_outer_constants():
    m = _model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[3] x, bool c) => (float[3] y)
    <float[3] w = {1.0, 4.0, 9.0}>
    {
      y = If(c) <then_branch = t () => (float[3] a) { s = Sqrt(w)  a = Add(x, s) },
                 else_branch = e () => (float[3] b) { k = Constant<value = float[3] {1.0, 1.0, 1.0}>()  b = Sub(x, k) }>
    }""")
    feeds = [{"x": np.ones(3, np.float32), "c": np.array(v)} for v in (True, False)]
    out = check_pass_contract(FoldConstants(), m, feeds, expect_modified=True)
    assert sorted(_ops(out)) == ["Add", "If", "Sub"]


def test_unrunnable_node_is_skipped_with_reason():
    # Reshape to an impossible shape: onnxruntime refuses it, the fold is skipped, the rest still folds.
    m = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[3] x, float[5] z) => (float[3] y, float[5] q) {
      a = Constant<value = float[3] {1.0, 2.0, 3.0}>()
      s = Constant<value = int64[1] {5}>()
      a2 = Constant<value = float[3] {1.0, 2.0, 3.0}>()
      b = Neg(a2)
      y = Add(x, b)
      r = Reshape(a, s)
      q = Add(z, r)
    }""")
    out, rep = optimize(m, ["fold_constants"], fixed_point=False, check="none")
    assert "Neg" not in _ops(out) and "Reshape" in _ops(out)
    assert any(s["op_type"] == "Reshape" and "onnxruntime" in s["reason"] for s in rep.passes[0].skipped)


# ---------------------------------------------------------------------------------------------- samples
@pytest.mark.parametrize("entry", MODELS, ids=MODEL_IDS)
def test_sample_models(entry):
    out = optimize_sample_model(entry, ["fold_constants"])
    if entry["name"] == "transformer_text":
        assert "Constant" not in _ops(out)


def test_constant_read_by_two_subgraphs_is_not_duplicated():
    # As an initializer it would be written into both branches; as a Constant node it is stored once.
    vals = ", ".join(["1.5"] * 100)
    m = _model(f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[100] x, bool c) => (float[100] y) {{
      w = Constant<value = float[100] {{{vals}}}>()
      y = If(c) <then_branch = t () => (float[100] a) {{ a = Add(x, w) }},
                 else_branch = e () => (float[100] b) {{ b = Sub(x, w) }}>
    }}""")
    feeds = [{"x": np.ones(100, np.float32), "c": np.array(v)} for v in (True, False)]
    out = check_pass_contract(FoldConstants(), m, feeds)
    assert out.ByteSize() <= m.ByteSize() + 64


def test_half_arithmetic_is_not_folded_but_data_movement_is():
    # onnxruntime computes half Mul in float32; folding it alone could differ by an ulp from the model.
    h = onnx.helper
    a = np.array([[0.1, 0.2], [0.3, 0.4]], np.float16)
    b = np.array([[3.3, 1.7], [2.9, 0.7]], np.float16)
    g = h.make_graph(
        [
            h.make_node("Transpose", ["a"], ["at"]),
            h.make_node("Mul", ["at", "b"], ["p"]),
            h.make_node("Add", ["x", "p"], ["y"]),
        ],
        "g",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT16, [2, 2])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT16, [2, 2])],
        [onnx.numpy_helper.from_array(a, "a"), onnx.numpy_helper.from_array(b, "b")],
    )
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    out, rep = optimize(m, ["fold_constants"], fixed_point=False)
    assert "Mul" in _ops(out) and "Transpose" not in _ops(out)
    assert any("float16" in s["reason"] for s in rep.passes[0].skipped)
    check_pass_contract(FoldConstants(), m, [{"x": np.ones((2, 2), np.float16)}], expect_modified=True)


@pytest.mark.parametrize("training,folded", [(0, True), (1, False)])
def test_dropout_folds_only_in_inference_mode(training, folded):
    m = _model(f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2,3] x) => (float[2,3] y)
    <float[2,3] a = {{1, 2, 3, 4, 5, 6}}, float r = {{0.5}}, bool t = {{{training}}}>
    {{
      d = Dropout<seed = 3>(a, r, t)
      y = Add(x, d)
    }}""")
    out, rep = optimize(m, ["fold_constants"], fixed_point=False)
    assert ("Dropout" not in _ops(out)) == folded
    if folded:
        check_pass_contract(FoldConstants(), m, [X], expect_modified=True)


def test_float8_cast_is_not_folded():
    # onnxruntime returns float8 values to Python as uint8: folding them would change the dtype.
    m = onnx.parser.parse_model("""
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[2] x) => (float[2] y) {
      a = Constant<value = float[2] {1.5, 2.5}>()
      f8 = Cast<to = 17>(a)
      b = Cast<to = 1>(f8)
      y = Add(x, b)
    }""")
    out, rep = optimize(m, ["fold_constants"], fixed_point=False, check="none")
    assert "Cast" in _ops(out)
    assert any("float8" in s["reason"] for s in rep.passes[0].skipped)
