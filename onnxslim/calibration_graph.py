"""Expose tensors of the main graph and of If/Loop/Scan bodies as main-graph outputs (for calibration).

A tensor in an If branch becomes an extra output of that branch (through an Identity) and of the If; the
other branch outputs an empty placeholder of the same element type, so when that branch runs the value is
empty and contributes nothing to the statistics. A tensor in a Loop/Scan body becomes an extra scan output
(values stacked over iterations: one more leading axis per enclosing loop). Nested bodies repeat this
outward. A scan output needs the same shape in every iteration; for Loops whose tensors change shape
across iterations (or an If inside a Loop taking different branches), ``flatten_loops`` instead
loop-carries the concatenation of the flattened values (quadratic copying, so only used as a fallback).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import onnx

from .errors import BadInputError
from .graph import iter_graphs

__all__ = ["expose_tensors"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Route:
    output: str  # main-graph output name carrying the tensor's values
    stacked: int  # leading axes added by Loop/Scan scan outputs (one per enclosing loop)
    flattened: bool = False  # carried out of a Loop flattened: only per-tensor stats make sense


@dataclass
class _Scope:
    graph: onnx.GraphProto
    owner: onnx.NodeProto | None  # the If/Loop/Scan node holding this graph (None: main graph)
    attr: str  # attribute name of this graph in the owner (then_branch, else_branch, body)
    parent: _Scope | None


def expose_tensors(
    model: onnx.ModelProto, names: list[str], *, flatten_loops: bool = False
) -> tuple[onnx.ModelProto, dict[str, _Route]]:
    """A copy of ``model`` whose main graph outputs also carry every tensor in ``names``.

    A tensor in an If branch becomes an extra output of that branch (through an Identity) and of the If;
    the other branch gets an empty placeholder of the same element type, so the value of a branch that did
    not run is empty and contributes nothing. A tensor in a Loop/Scan body becomes an extra scan output
    (values stacked over iterations: one more leading axis). Nested bodies repeat this outward.
    ``flatten_loops``: instead, Loop bodies carry the concatenation of the flattened per-iteration values
    (works when shapes change across iterations; the route is then ``flattened``: no axes survive).
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    types = _elem_types(m)
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 1)
    scopes: dict[str, _Scope] = {}
    used: set[str] = set()

    def walk(g: onnx.GraphProto, scope: _Scope) -> None:
        defined = [i.name for i in g.input] + [t.name for t in g.initializer]
        defined += [t.values.name for t in g.sparse_initializer]
        for n in g.node:
            defined += [o for o in n.output if o]
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g, _Scope(a.g, n, a.name, scope))
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for sub in a.graphs:
                        walk(sub, _Scope(sub, n, a.name, scope))
        for d in defined:
            scopes.setdefault(d, scope)
        used.update(defined)
        used.update(o.name for o in g.output)
        used.update(n.name for n in g.node)

    main = _Scope(m.graph, None, "", None)
    walk(m.graph, main)
    missing = [n for n in names if n not in scopes]
    if missing:
        raise BadInputError(
            f"tensor(s) {', '.join(missing[:10])} are not in the model (not an input, initializer or node output "
            "of the main graph or any subgraph); check the names"
        )

    counter = [0]

    def fresh(base: str) -> str:
        while True:
            counter[0] += 1
            cand = f"{base}__calib{counter[0]}"
            if cand not in used:
                used.add(cand)
                return cand

    routes: dict[str, _Route] = {}
    main_outputs = {o.name for o in m.graph.output}
    for name in names:
        scope, current, stacked, flattened = scopes[name], name, 0, False
        while scope.owner is not None:
            flattened = flattened or (flatten_loops and scope.owner.op_type == "Loop")
            current, stacked = _route_out(scope, current, types, fresh, stacked, opset, flatten_loops)
            scope = scope.parent  # type: ignore[assignment]
        if current not in main_outputs:
            elem = types.get(current)
            vi = onnx.helper.make_tensor_value_info(current, elem, None) if elem else onnx.ValueInfoProto(name=current)
            m.graph.output.append(vi)
            main_outputs.add(current)
        routes[name] = _Route(current, stacked, flattened)
    return m, routes


def _route_out(
    scope: _Scope,
    name: str,
    types: dict[str, int],
    fresh: Callable[[str], str],
    stacked: int,
    opset: int,
    flatten_loops: bool,
) -> tuple[str, int]:
    """Add ``name`` (defined in ``scope``'s graph) as an output of the owner node; the new name and stacking."""
    node, g = scope.owner, scope.graph
    assert node is not None and scope.parent is not None
    elem = types.get(name)
    local = fresh(name)
    if elem:
        g.node.append(onnx.helper.make_node("Identity", [name], [local], name=fresh("calib_identity")))
    else:  # unknown element type: cast so the placeholder's type is known
        elem = onnx.TensorProto.FLOAT
        g.node.append(onnx.helper.make_node("Cast", [name], [local], to=elem, name=fresh("calib_cast")))
    outer = fresh(name)
    types[outer] = elem
    if node.op_type == "Loop" and flatten_loops:
        _carry_flat(node, g, scope.parent.graph, local, outer, elem, fresh)
        return outer, stacked
    g.output.append(onnx.helper.make_tensor_value_info(local, elem, None))
    # Optional trailing outputs may be omitted on the node: pad so the appended one lines up with the body's.
    want = len(g.output) - (1 if node.op_type == "Loop" else 0)
    _pad_outputs(node, want - 1, fresh)
    node.output.append(outer)
    if node.op_type == "If":
        other_attr = "else_branch" if scope.attr == "then_branch" else "then_branch"
        other = next(a.g for a in node.attribute if a.name == other_attr)
        ph = fresh(f"{name}_placeholder")
        empty = onnx.helper.make_tensor(ph + "_value", elem, [0], [])
        other.node.append(onnx.helper.make_node("Constant", [], [ph], value=empty, name=fresh("calib_placeholder")))
        other.output.append(onnx.helper.make_tensor_value_info(ph, elem, None))
        return outer, stacked
    if node.op_type in ("Loop", "Scan"):
        # Body outputs appended last are scan outputs (stacked over iterations).
        if node.op_type == "Scan":
            for attr_name in ("scan_output_axes", "scan_output_directions"):
                for a in node.attribute:
                    if a.name == attr_name:
                        a.ints.append(0)
        # Scan-8 outputs carry a batch axis before the scan axis.
        extra = 2 if node.op_type == "Scan" and opset < 9 else 1
        return outer, stacked + extra
    raise BadInputError(
        f"tensor '{name}' lives in a subgraph of a {node.op_type} node ('{node.name}'); only If, Loop and Scan "
        "bodies can be observed"
    )


def _pad_outputs(node: onnx.NodeProto, n: int, fresh: Callable[[str], str]) -> None:
    # Named, not "": onnxruntime rejects empty names before a used output.
    while len(node.output) < n:
        node.output.append(fresh(f"{node.name or node.op_type}_unused"))


def _carry_flat(
    node: onnx.NodeProto,
    body: onnx.GraphProto,
    parent: onnx.GraphProto,
    local: str,
    outer: str,
    elem: int,
    fresh: Callable[[str], str],
) -> None:
    """Loop-carry the concatenation of every iteration's flattened ``local`` (shapes may change per iteration).

    Costs O(iterations^2) copying, so it is only the fallback when scan outputs fail.
    """
    carried = len(body.input) - 2  # loop-carried values before this one
    init, acc_in, acc_out, flat, minus1 = (
        fresh(f"{outer}_{k}") for k in ("init", "acc_in", "acc_out", "flat", "shape")
    )
    parent.node.insert(
        0,
        onnx.helper.make_node(
            "Constant",
            [],
            [init],
            value=onnx.helper.make_tensor(init + "_value", elem, [0], []),
            name=fresh("calib_init"),
        ),
    )
    body.input.append(onnx.helper.make_tensor_value_info(acc_in, elem, [None]))
    body.node.extend(
        [
            onnx.helper.make_node(
                "Constant",
                [],
                [minus1],
                name=fresh("calib_shape"),
                value=onnx.helper.make_tensor(minus1 + "_value", onnx.TensorProto.INT64, [1], [-1]),
            ),
            onnx.helper.make_node("Reshape", [local, minus1], [flat], name=fresh("calib_flatten")),
            onnx.helper.make_node("Concat", [acc_in, flat], [acc_out], axis=0, name=fresh("calib_concat")),
        ]
    )
    outs = list(body.output)
    outs.insert(1 + carried, onnx.helper.make_tensor_value_info(acc_out, elem, [None]))
    del body.output[:]
    body.output.extend(outs)
    node.input.append(init)
    _pad_outputs(node, carried, fresh)
    node_outs = list(node.output)
    node_outs.insert(carried, outer)
    del node.output[:]
    node.output.extend(node_outs)


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor whose type is known (shape inference fills subgraph value_info)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=False)
    except Exception as e:  # inference is a help here, not a requirement
        log.debug("shape inference failed (%s); using declared types only", e)
        inferred = model
    types: dict[str, int] = {}
    for g in iter_graphs(inferred.graph):  # names are unique across scopes (ONNX forbids shadowing)
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                types.setdefault(vi.name, vi.type.tensor_type.elem_type)
        for t in g.initializer:
            types.setdefault(t.name, t.data_type)
        for n in g.node:
            if n.op_type == "Constant" and n.output:
                for a in n.attribute:
                    if a.name == "value":
                        types.setdefault(n.output[0], a.t.data_type)
    return types
