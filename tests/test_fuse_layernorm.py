"""fuse_layernorm: tiny decomposed LayerNorms -> checker -> pass -> structure -> ORT parity -> idempotence."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from onnxslim.pipeline import optimize
from onnxslim.registry import get_pass

from _fusion_testlib import init, model, ops, rng, run_pass

Pass = get_pass("fuse_layernorm")
B, S, C = 2, 3, 8


def _mean(name: str, src: str, out: str, opset: int, axes=(-1,)) -> tuple[onnx.NodeProto, list]:
    if opset >= 18:
        return helper.make_node("ReduceMean", [src, f"{name}_axes"], [out], keepdims=1), [
            init(f"{name}_axes", np.array(axes, np.int64))
        ]
    return helper.make_node("ReduceMean", [src], [out], axes=list(axes), keepdims=1), []


def _layernorm(
    opset: int,
    *,
    square="Pow",
    divide="Div",
    gamma=True,
    beta=True,
    axes=(-1,),
    shape=(B, S, C),
    extra_outputs=(),
    two=np.float32,
    gamma_lead=(),
):
    r = rng(0)
    norm = shape[len(shape) - len(axes) :]
    m1, i1 = _mean("m1", "x", "mu", opset, axes)
    m2, i2 = _mean("m2", "sq", "var", opset, axes)
    nodes = [m1, helper.make_node("Sub", ["x", "mu"], ["d"])]
    inits = i1 + i2 + [init("eps", np.array(1e-5, np.float32))]
    if square == "Pow":
        nodes.append(helper.make_node("Pow", ["d", "two"], ["sq"]))
        inits.append(init("two", np.array(2, two)))
    else:
        nodes.append(helper.make_node("Mul", ["d", "d"], ["sq"]))
    nodes += [m2, helper.make_node("Add", ["var", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["s"])]
    if divide == "Div":
        nodes.append(helper.make_node("Div", ["d", "s"], ["n"]))
    else:
        nodes += [helper.make_node("Reciprocal", ["s"], ["rs"]), helper.make_node("Mul", ["d", "rs"], ["n"])]
    last = "n"
    if gamma:
        nodes.append(helper.make_node("Mul", [last, "gamma"], ["g"]))
        inits.append(init("gamma", r.standard_normal(tuple(gamma_lead) + tuple(norm)).astype(np.float32)))
        last = "g"
    if beta:
        nodes.append(helper.make_node("Add", ["beta", last], ["y"]))  # constant first: either order matches
        inits.append(init("beta", r.standard_normal(norm).astype(np.float32)))
        last = "y"
    nodes.append(helper.make_node("Relu", [last], ["out"]))
    grows = len(gamma_lead) + len(norm) > len(shape)
    outputs = [("out", None if grows else list(shape))] + [(o, None) for o in extra_outputs]
    return model(nodes, [("x", list(shape))], outputs, inits, opset=opset)


def _feeds(shape=(B, S, C)):
    r = rng(5)
    return [{"x": (r.standard_normal(shape) * 3 + 1).astype(np.float32)} for _ in range(2)]


def _ln_attrs(m: onnx.ModelProto) -> dict:
    (ln,) = [n for n in m.graph.node if n.op_type == "LayerNormalization"]
    return {a.name: helper.get_attribute_value(a) for a in ln.attribute}


def test_opset17_full_pattern_becomes_one_layernorm():
    m = _layernorm(17)
    out = run_pass(Pass(), m, feeds=_feeds())
    assert dict(ops(out)) == {"LayerNormalization": 1, "Relu": 1}
    attrs = _ln_attrs(out)
    assert attrs["axis"] == -1 and abs(attrs["epsilon"] - 1e-5) < 1e-12
    _, report = optimize(m, [Pass()], fixed_point=False)
    assert report.passes[0].stats == {"layernorms_fused": 1}


def test_opset18_axes_input_mul_square_reciprocal_no_gamma_beta():
    m = _layernorm(18, square="Mul", divide="Reciprocal", gamma=False, beta=False)
    out = run_pass(Pass(), m, feeds=_feeds())
    assert dict(ops(out)) == {"LayerNormalization": 1, "Relu": 1}
    # Ones and zeros of the normalized shape stand in for the missing scale and bias.
    values = {t.name: onnx.numpy_helper.to_array(t) for t in out.graph.initializer}
    (ln,) = [n for n in out.graph.node if n.op_type == "LayerNormalization"]
    np.testing.assert_array_equal(values[ln.input[1]], np.ones(C, np.float32))
    np.testing.assert_array_equal(values[ln.input[2]], np.zeros(C, np.float32))


def test_integer_pow_exponent_and_gamma_with_leading_ones():
    m = _layernorm(17, two=np.int64, gamma_lead=(1, 1))
    out = run_pass(Pass(), m, feeds=_feeds())
    assert dict(ops(out)) == {"LayerNormalization": 1, "Relu": 1}
    (ln,) = [n for n in out.graph.node if n.op_type == "LayerNormalization"]
    scale = [t for t in out.graph.initializer if t.name == ln.input[1]][0]
    assert list(scale.dims) == [C]  # stored in the normalized shape LayerNormalization takes


def test_gamma_that_would_grow_the_output_is_left_alone():
    m = _layernorm(17, gamma_lead=(4, 1, 1, 1))
    out = run_pass(Pass(), m, expect_modified=False, feeds=_feeds())
    assert "LayerNormalization" not in ops(out)


def test_two_trailing_axes_with_gamma_only():
    m = _layernorm(18, beta=False, axes=(1, 2))
    out = run_pass(Pass(), m, feeds=_feeds())
    assert dict(ops(out)) == {"LayerNormalization": 1, "Relu": 1}
    assert _ln_attrs(out)["axis"] == -2


def test_non_trailing_axes_are_left_alone():
    m = _layernorm(17, axes=(1,), beta=False, gamma=False)
    out = run_pass(Pass(), m, expect_modified=False, feeds=_feeds())
    assert "LayerNormalization" not in ops(out)


def test_opset16_is_skipped_with_a_reason():
    m = _layernorm(16)
    out = run_pass(Pass(), m, expect_modified=False, feeds=_feeds())
    assert "LayerNormalization" not in ops(out)
    _, report = optimize(m, [Pass()], fixed_point=False)
    assert any("opset >= 17" in s["reason"] for s in report.passes[0].skipped)


def test_intermediate_graph_output_is_skipped():
    m = _layernorm(17, extra_outputs=("var",))
    out = run_pass(Pass(), m, expect_modified=False, feeds=_feeds())
    assert "LayerNormalization" not in ops(out)
    _, report = optimize(m, [Pass()], fixed_point=False)
    assert report.passes[0].skipped, "the skip should carry a reason"
