"""Property tests: on random small graphs with duplicated subexpressions, duplicated constants and no-ops,
the exact passes (alone, together, and the default pipeline) leave every output bit-for-bit unchanged
and never add nodes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxslim.graph import iter_graphs
from onnxslim.pipeline import optimize
from onnxslim.testing import assert_outputs_close, run_model

MY_PASSES = ["eliminate_identity_ops", "eliminate_common_subexpressions", "share_identical_weights"]
SETTINGS = settings(
    max_examples=50,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

_UNARY = ["Relu", "Neg", "Abs", "Sigmoid", "Identity"]
_BINARY = ["Add", "Mul", "Sub", "Max"]
_CONST_VALUES = {  # shapes broadcast to [2,3]; ones/zeros make no-ops, the rest are real
    "ones3": np.ones(3, np.float32),
    "zeros23": np.zeros((2, 3), np.float32),
    "ones13": np.ones((1, 3), np.float32),
    "v3": np.array([0.5, -1.5, 2.0], np.float32),
    "v23": np.arange(6, dtype=np.float32).reshape(2, 3) / 4,
    "w33": (np.arange(9, dtype=np.float32).reshape(3, 3) - 4) / 8,
}


@st.composite
def graphs(draw) -> onnx.ModelProto:
    nodes: list[onnx.NodeProto] = []
    inits: dict[str, np.ndarray] = {}
    pool = ["x0", "x1"]

    def const(kind: str) -> str:
        # Sometimes a fresh copy of a constant already stored under another name (a duplicate weight).
        copies = [n for n in inits if n.startswith(kind + "_")]
        if copies and draw(st.booleans()):
            return draw(st.sampled_from(copies))
        name = f"{kind}_{len(inits)}"
        inits[name] = _CONST_VALUES[kind].copy()
        return name

    def emit(op: str, inputs: list[str], **attrs) -> None:
        out = f"t{len(nodes)}"
        nodes.append(h.make_node(op, inputs, [out], name=f"n{len(nodes)}", **attrs))
        pool.append(out)

    for _ in range(draw(st.integers(2, 12))):
        kind = draw(st.sampled_from(["unary", "binary", "const", "matmul", "reshape", "noop", "dup", "dup"]))
        a = draw(st.sampled_from(pool))
        if kind == "unary":
            emit(draw(st.sampled_from(_UNARY)), [a])
        elif kind == "binary":
            emit(draw(st.sampled_from(_BINARY)), [a, draw(st.sampled_from(pool))])
        elif kind == "const":
            op = draw(st.sampled_from(["Add", "Mul", "Sub", "Div"]))
            c = const(draw(st.sampled_from(["ones3", "zeros23", "ones13", "v3", "v23"])))
            if op == "Div" and c.startswith("zeros"):
                c = const("ones13")
            emit(op, [a, c] if op in ("Sub", "Div") or draw(st.booleans()) else [c, a])
        elif kind == "matmul":
            emit("MatMul", [a, const("w33")])
        elif kind == "reshape":
            shape = draw(st.sampled_from([[3, 2], [2, 3], [0, -1], [6, 1]]))
            name = f"shape_{len(inits)}"
            inits[name] = np.array(shape, np.int64)
            emit("Reshape", [a, name])
            if shape != [2, 3] and shape != [0, -1]:
                inits[name + "b"] = np.array([2, 3], np.int64)
                mid = pool[-1]
                emit("Reshape", [mid, name + "b"])
                pool.remove(mid)  # only [2,3] values are reused
        elif kind == "noop":
            op = draw(st.sampled_from(["Cast", "Transpose", "Identity", "Dropout"]))
            attrs = {"to": T.FLOAT} if op == "Cast" else {"perm": [0, 1]} if op == "Transpose" else {}
            emit(op, [a], **attrs)
        elif nodes:  # dup: the same op on the same inputs again
            src = draw(st.sampled_from([n for n in nodes if n.output[0] in pool]))
            emit(src.op_type, list(src.input), **{at.name: h.get_attribute_value(at) for at in src.attribute})
    produced = pool[2:]
    outs = draw(st.lists(st.sampled_from(produced), min_size=1, max_size=3, unique=True)) if produced else []
    if not outs:
        emit("Relu", ["x0"])
        outs = [pool[-1]]
    graph = h.make_graph(
        nodes,
        "random",
        [h.make_tensor_value_info(n, T.FLOAT, [2, 3]) for n in ("x0", "x1")],
        [h.make_tensor_value_info(o, T.FLOAT, [2, 3]) for o in outs],
        [nh.from_array(v, k) for k, v in inits.items()],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


FEEDS = [
    {
        "x0": np.array([[-1.0, 0.0, 2.5], [3.0, -0.0, -4.0]], np.float32),
        "x1": np.array([[0.25, -2.0, 1.0], [-3.5, 5.0, 0.5]], np.float32),
    }
]


def _count_nodes(model: onnx.ModelProto) -> int:
    return sum(len(g.node) for g in iter_graphs(model.graph))


def _assert_same(model: onnx.ModelProto, passes) -> onnx.ModelProto:
    onnx.checker.check_model(model, full_check=True)
    out, _ = optimize(model, passes, on_pass_error="raise")
    names = [o.name for o in model.graph.output]
    assert [o.name for o in out.graph.output] == names
    for feed in FEEDS:
        assert_outputs_close(run_model(model, feed), run_model(out, feed), names)
    assert _count_nodes(out) <= _count_nodes(model)
    return out


@SETTINGS
@given(graphs())
def test_default_pipeline_keeps_outputs(model):
    _assert_same(model, None)


@SETTINGS
@given(graphs())
def test_my_passes_together_keep_outputs_and_reach_a_fixed_point(model):
    out = _assert_same(model, MY_PASSES)
    _, again = optimize(out, MY_PASSES, on_pass_error="raise")
    assert not any(r.modified for r in again.passes)


@pytest.mark.parametrize("name", MY_PASSES)
def test_each_pass_keeps_outputs(name):
    @SETTINGS
    @given(graphs())
    def check(model):
        _assert_same(model, [name])

    check()


# ------------------------------------------------------------------------------------------- sample models
@pytest.mark.parametrize("passes", [[p] for p in MY_PASSES] + [MY_PASSES], ids=MY_PASSES + ["together"])
def test_sample_models_keep_outputs_and_do_not_grow(sample, passes):
    from conftest import eval_feeds

    model = onnx.load(str(sample["model_path"]))
    out, report = optimize(model, passes, on_pass_error="raise")
    names = [o.name for o in model.graph.output]
    for feed in eval_feeds(sample):
        feed = {k: v for k, v in feed.items() if not k.startswith("__")}
        assert_outputs_close(run_model(model, feed), run_model(out, feed), names, rtol=1e-5, atol=1e-5)
    assert _count_nodes(out) <= _count_nodes(model)
    stored = sum(t.ByteSize() for g in iter_graphs(out.graph) for t in g.initializer)
    assert stored <= sum(t.ByteSize() for g in iter_graphs(model.graph) for t in g.initializer)
