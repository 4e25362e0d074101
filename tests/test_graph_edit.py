"""The public graph-editing API (onnxslim.graph_edit): constants behind tensors, fresh names, the editor."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.graph import iter_graphs, load_model
from onnxslim.graph_edit import (
    GraphEditor,
    Names,
    const_value,
    constant_source,
    is_shared,
    peek_values,
    producer,
    replace_uses,
)
from onnxslim.gs_bridge import import_graph
from onnxslim.pass_base import PassContext

from _graphs import parse_checked

IF_MODEL = parse_checked("""
<ir_version: 8, opset_import: ["" : 17]>
g (bool c, float[2] x) => (float[2] y, float[2] z) <float[2] w = {1.0, 2.0}>
{
    k = Constant <value = float[2] {3.0, 4.0}> ()
    t = Identity (k)
    a = Add (x, t)
    y = If (c) <
        then_branch = then_g () => (float[2] o1) { o1 = Mul (a, w) },
        else_branch = else_g () => (float[2] o2) { o2 = Identity (a) }
    >
    z = Neg (a)
}
""")


def _graph():
    return import_graph(load_model(IF_MODEL))


def _node(graph, op):
    return next(n for g in iter_graphs(graph) for n in g.nodes if n.op == op)


def test_one_walker_for_protos_and_graphsurgeon_graphs():
    graph = _graph()
    assert [g.name for g in iter_graphs(graph)] == ["g", "then_g", "else_g"]
    assert [g.name for g in iter_graphs(IF_MODEL.graph)] == ["g", "then_g", "else_g"]


def test_constants_behind_tensors():
    graph = _graph()
    add = _node(graph, "Add")
    t = add.inputs[1]  # Identity(Constant node)
    np.testing.assert_array_equal(const_value(t), [3.0, 4.0])
    assert const_value(t, through_identity=False) is None
    src = constant_source(t)
    assert src.node is not None and src.node.op == "Constant" and isinstance(src.constant, gs.Constant)
    w = _node(graph, "Mul").inputs[1]  # an outer-scope initializer read inside the then branch
    assert constant_source(w).node is None and constant_source(w).constant is w
    np.testing.assert_array_equal(peek_values(w), [1.0, 2.0])
    assert const_value(add.inputs[0]) is None and producer(add.inputs[0]) is None  # a graph input
    assert not is_shared(w)


def test_names_are_unique_across_the_whole_model():
    graph = _graph()
    names = Names(graph)
    assert "o1" in names and "o2" in names  # subgraph tensors count
    assert names.fresh("o1") == "o1_1"
    assert names.fresh("o1") == "o1_2"
    assert names.fresh("brand_new") == "brand_new"
    assert names.fresh("brand_new") == "brand_new_1"


def test_editor_rewires_bypasses_and_removes():
    graph = _graph()
    ctx = PassContext(graph=graph, opset=17)
    neg = _node(graph, "Neg")
    ident = _node(graph, "Identity")  # Identity(k) in the main graph
    add = _node(graph, "Add")
    with ctx.edit(graph) as edit:
        assert edit.owns(neg) and not edit.owns(_node(graph, "Mul"))  # the Mul lives in a body
        assert not edit.rewire_readers(neg.outputs[0], add.outputs[0])  # z is a graph output: refused
        assert edit.sole_consumer(ident.outputs[0]) is add
        assert edit.bypass_node(ident)  # Add now reads the Constant's output directly
        assert add.inputs[1].inputs[0].op == "Constant"
        edit.set_constant_input(add, 1, np.array([5.0, 6.0], np.float32), "bias")
        assert isinstance(add.inputs[1], gs.Constant) and add.inputs[1].name == "k"  # the freed name is reused
    ops = [n.op for n in graph.nodes]
    assert "Identity" not in ops and "Constant" not in ops  # removed, and the dead Constant node with it
    assert ctx.names.fresh("k") == "k_1"


def test_replace_uses_reaches_subgraphs_and_outputs():
    graph = _graph()
    add = _node(graph, "Add")
    x = add.inputs[0]
    replace_uses(graph, add.outputs[0], x)
    assert _node(graph, "Mul").inputs[0] is x  # inside the then branch
    else_g = next(g for g in iter_graphs(graph) if g.name == "else_g")
    assert else_g.nodes[0].inputs[0] is x


def test_pass_context_names_are_per_run():
    graph = _graph()
    ctx = PassContext(graph=graph, opset=17)
    assert ctx.names.fresh("fresh") == "fresh"
    assert ctx.names.fresh("fresh") == "fresh_1"  # the same run remembers
    again = ctx.for_graph(graph)  # the pipeline gives every pass run its own
    assert again.names.fresh("fresh") == "fresh"
    assert isinstance(ctx.edit(graph), GraphEditor)
