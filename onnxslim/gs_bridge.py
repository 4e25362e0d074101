"""The bridge between ONNX protos and onnx-graphsurgeon graphs, where passes do their work.

Import keeps constants lazy (external ones bound to their folder); export puts the model's contract back
and works around what graphsurgeon cannot represent or writes twice: optional/map types, type-proto and
sparse attributes, and outer-scope constants copied into every subgraph that reads them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto
from onnx_graphsurgeon.ir.tensor import LazyValues

from .graph import LoadedModel, ModelContract, _is_external, iter_graphs, tensor_to_array

__all__ = [
    "ExternalLazyValues",
    "RawAttribute",
    "quiet_graphsurgeon",
    "peek_values",
    "import_graph",
    "export_graph",
    "value_types",
    "graph_signature",
    "export_standalone",
]


class ExternalLazyValues(LazyValues):
    """gs lazy values that know which folder the external data lives in."""

    def __init__(self, tensor: TensorProto, base_dir: Path | None):
        super().__init__(tensor)
        self.base_dir = base_dir

    def load(self):
        return np.array(tensor_to_array(self.tensor, self.base_dir))


def quiet_graphsurgeon():
    """graphsurgeon prints its warnings to stdout; silence it while we work (errors still raise)."""
    from onnx_graphsurgeon.logger import G_LOGGER

    return G_LOGGER.suppress(G_LOGGER.CRITICAL)


_RAW_ATTR_TYPES = {
    onnx.AttributeProto.TYPE_PROTO,
    onnx.AttributeProto.TYPE_PROTOS,
    onnx.AttributeProto.SPARSE_TENSOR,
    onnx.AttributeProto.SPARSE_TENSORS,
}


@dataclass
class RawAttribute:
    """An attribute graphsurgeon cannot represent (type protos, sparse tensors), carried through untouched."""

    proto: onnx.AttributeProto


def _attach_raw_attributes(gproto: onnx.GraphProto, graph: gs.Graph) -> None:
    for pnode, node in zip(gproto.node, graph.nodes):
        for attr in pnode.attribute:
            if attr.type in _RAW_ATTR_TYPES:
                node.attrs[attr.name] = RawAttribute(copy.deepcopy(attr))
            elif attr.type == onnx.AttributeProto.GRAPH and isinstance(node.attrs.get(attr.name), gs.Graph):
                _attach_raw_attributes(attr.g, node.attrs[attr.name])


def _detach_raw_attributes(graph: gs.Graph) -> list:
    """Pop RawAttributes (graphsurgeon can't export them); returns what to put back, in node order."""
    out = []
    for node in graph.nodes:
        raw = [(k, v) for k, v in node.attrs.items() if isinstance(v, RawAttribute)]
        for k, _ in raw:
            del node.attrs[k]
        subs = {k: _detach_raw_attributes(v) for k, v in node.attrs.items() if isinstance(v, gs.Graph)}
        out.append((node, raw, subs))
    return out


def _reattach_raw_attributes(detached: list, gproto: onnx.GraphProto | None) -> None:
    for i, (node, raw, subs) in enumerate(detached):
        pnode = gproto.node[i] if gproto is not None else None
        for k, v in raw:
            node.attrs[k] = v
            if pnode is not None:
                pnode.attribute.append(copy.deepcopy(v.proto))
        for name, sub in subs.items():
            psub = None
            if pnode is not None:
                psub = next(
                    (a.g for a in pnode.attribute if a.name == name and a.type == onnx.AttributeProto.GRAPH), None
                )
            _reattach_raw_attributes(sub, psub)


def peek_values(const: gs.Constant) -> np.ndarray:
    """A constant's values WITHOUT caching them on the tensor (``const.values`` keeps them loaded).

    Passes that scan many weights (hashing, statistics) use this so memory holds one tensor at a time.
    """
    values = const._values
    if isinstance(values, ExternalLazyValues):
        return values.load()
    if isinstance(values, LazyValues):
        return np.asarray(onnx.numpy_helper.to_array(values.tensor))
    return np.asarray(values)


def import_graph(loaded: LoadedModel) -> gs.Graph:
    """The model as a graphsurgeon graph; external constants stay lazy and bound to their folder."""
    with quiet_graphsurgeon():
        graph = gs.import_onnx(loaded.proto)
    _attach_raw_attributes(loaded.proto.graph, graph)
    if loaded.has_external_data:
        for g in [graph, *graph.functions]:
            for sub in iter_graphs(g):
                for t in sub.tensors().values():
                    if (
                        isinstance(t, gs.Constant)
                        and isinstance(t._values, LazyValues)
                        and _is_external(t._values.tensor)
                    ):
                        t._values = ExternalLazyValues(t._values.tensor, loaded.base_dir)
                        # gs would stamp EXTERNAL on the export of values a pass has loaded (inline bytes,
                        # no location) and save_model then fails; lazy values export their own proto anyway.
                        t.data_location = None
    return graph


_GS_EXPORTABLE = {"tensor_type", "sequence_type", "sparse_tensor_type"}


def value_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Declared types of every named value (graph I/O and value_info, subgraphs included)."""
    types: dict[str, onnx.TypeProto] = {}
    for g in iter_graphs(model.graph):
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            if vi.type.WhichOneof("value") and vi.name not in types:
                types[vi.name] = vi.type
    return types


def export_graph(
    graph: gs.Graph, contract: ModelContract, types: dict[str, onnx.TypeProto] | None = None
) -> onnx.ModelProto:
    """Export and put the model's contract back (opsets, IR version, metadata, exact I/O types).

    graphsurgeon cannot write optional or map types; such values are exported untyped and get their
    declared type back from ``types`` (the source model's value types, by name).
    """
    hidden: list[tuple[gs.Variable, Any]] = []
    for g in iter_graphs(graph):
        for t in g.tensors().values():
            if (
                isinstance(t, gs.Variable)
                and t.dtype is not None
                and getattr(t, "type", "tensor_type") not in _GS_EXPORTABLE
            ):
                hidden.append((t, t.dtype))
                t.dtype = None
    detached = _detach_raw_attributes(graph)
    model = None
    try:
        with quiet_graphsurgeon():
            model = gs.export_onnx(
                graph, do_type_check=False, opset_imports=[copy.deepcopy(o) for o in contract.opset_import]
            )
    finally:
        for t, dtype in hidden:
            t.dtype = dtype
        _reattach_raw_attributes(detached, model.graph if model is not None else None)
    if types:
        for g in iter_graphs(model.graph):
            for vi in list(g.input) + list(g.output) + list(g.value_info):
                if not vi.type.WhichOneof("value") and vi.name in types:
                    vi.type.CopyFrom(types[vi.name])
    _hoist_sibling_copies(model.graph)
    _drop_outer_scope_copies(model.graph, {})
    contract.restore(model)
    if model.ir_version < 4:
        # IR 3 requires every initializer to be declared as a graph input too.
        declared = {i.name for i in model.graph.input}
        for t in model.graph.initializer:
            if t.name not in declared:
                model.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return model


def export_standalone(graph: gs.Graph, opset: int) -> onnx.ModelProto:
    """The graph as it is mid-pipeline, as a model of its own (to run it in onnxruntime or infer its shapes):
    the graph's opset imports (``opset`` when it has none), the lowest IR version they allow (at least 7),
    no metadata. Not for saving: the pipeline's export puts the model's contract back instead."""
    opsets = [onnx.helper.make_opsetid(d.domain, d.version) for d in (graph.import_domains or [])]
    if not opsets:
        opsets = [onnx.helper.make_opsetid("", opset)]
    try:
        ir = max(
            7,
            int(getattr(graph, "ir_version", 0) or 0),
            onnx.helper.find_min_ir_version_for(opsets, ignore_unknown=True),
        )
    except Exception:  # noqa: BLE001 - unknown domains
        ir = onnx.IR_VERSION
    contract = ModelContract(
        inputs=[],
        outputs=[],
        ir_version=ir,
        opset_import=opsets,
        producer_name="onnxslim",
        producer_version="",
        domain="",
        model_version=0,
        doc_string="",
        graph_name=graph.name or "graph",
        graph_doc_string="",
        metadata_props=[],
    )
    return export_graph(graph, contract)


def _hoist_sibling_copies(root: onnx.GraphProto) -> None:
    """Store once, in the closest enclosing graph, an initializer that graphsurgeon copied into sibling subgraphs.

    A constant read only inside subgraphs (e.g. both If branches) is exported into each of them; the source
    model held it once in an enclosing graph. Equal copies of one name go back to the closest graph that
    encloses them all (when the name is free there); ``_drop_outer_scope_copies`` then drops the copies.
    """
    parent: dict[int, onnx.GraphProto | None] = {}
    order: list[onnx.GraphProto] = []

    def walk(g: onnx.GraphProto, p: onnx.GraphProto | None) -> None:
        parent[id(g)] = p
        order.append(g)
        for node in g.node:
            for attr in node.attribute:
                for sub in (
                    [attr.g]
                    if attr.type == onnx.AttributeProto.GRAPH
                    else attr.graphs
                    if attr.type == onnx.AttributeProto.GRAPHS
                    else []
                ):
                    walk(sub, g)

    def chain(g: onnx.GraphProto | None) -> list[onnx.GraphProto]:
        out = []
        while g is not None:
            out.append(g)
            g = parent[id(g)]
        return out

    walk(root, None)
    copies: dict[str, list[tuple[onnx.GraphProto, TensorProto]]] = {}
    for g in order:
        for t in g.initializer:
            copies.setdefault(t.name, []).append((g, t))
    for name, found in copies.items():
        if len(found) < 2 or any(t != found[0][1] for _, t in found[1:]):
            continue
        chains = [chain(g) for g, _ in found]
        lca = next((c for c in chains[0] if all(any(c is x for x in ch) for ch in chains[1:])), None)
        if lca is None or any(g is lca for g, _ in found):
            continue
        taken = any(
            name in {i.name for i in g.input} | {o for n in g.node for o in n.output} | {t.name for t in g.initializer}
            for g in chain(lca)
        )
        if not taken:
            lca.initializer.append(copy.deepcopy(found[0][1]))


def _drop_outer_scope_copies(graph: onnx.GraphProto, outer: dict[str, TensorProto]) -> None:
    """Remove subgraph initializers that copy an outer-scope initializer of the same name.

    graphsurgeon exports every constant a subgraph reads as an initializer of that subgraph, even when the
    same constant is an initializer of an enclosing graph; ONNX resolves the name from the outer scope, so
    the copy only makes the model bigger.
    """
    keep = []
    outputs = {o.name for o in graph.output}  # a subgraph output must be defined inside the subgraph
    for t in graph.initializer:
        if t.name in outer and outer[t.name] == t and t.name not in outputs:
            continue
        keep.append(t)
    if outer and len(keep) != len(graph.initializer):
        dropped = {t.name for t in graph.initializer} - {t.name for t in keep}
        kept_vi = [v for v in graph.value_info if v.name not in dropped]
        del graph.initializer[:]
        graph.initializer.extend(keep)
        del graph.value_info[:]
        graph.value_info.extend(kept_vi)
    scope = dict(outer)
    scope.update((t.name, t) for t in graph.initializer)
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _drop_outer_scope_copies(attr.g, scope)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    _drop_outer_scope_copies(g, scope)


def graph_signature(model: onnx.ModelProto) -> tuple:
    """The computation a model describes (nodes, attributes, initializer names/types/shapes, I/O names),
    without value_info or weight bytes: equal signatures mean no pass changed the graph's structure."""

    def attr_sig(a: onnx.AttributeProto):
        if a.type == onnx.AttributeProto.GRAPH:
            return a.name, graph_sig(a.g)
        if a.type == onnx.AttributeProto.GRAPHS:
            return a.name, tuple(graph_sig(g) for g in a.graphs)
        if a.type == onnx.AttributeProto.TENSOR:
            return a.name, (a.t.data_type, tuple(a.t.dims), a.t.raw_data or a.t.SerializeToString())
        return a.name, a.SerializeToString()

    def graph_sig(g: onnx.GraphProto):
        nodes = tuple(
            (
                n.domain,
                n.op_type,
                tuple(n.input),
                tuple(n.output),
                tuple(sorted((attr_sig(a) for a in n.attribute), key=lambda x: x[0])),
            )
            for n in g.node
        )
        inits = tuple(sorted((t.name, t.data_type, tuple(t.dims)) for t in g.initializer))
        return nodes, inits, tuple(i.name for i in g.input), tuple(o.name for o in g.output)

    return graph_sig(model.graph)
