"""Is the input a model onnxslim can work on? Refused with one line (BadInputError, exit 2) when it is not;
``validate_graph`` is the cheap structural check the pipeline also runs after every pass."""

from __future__ import annotations

from typing import Any

import onnx
import onnx_graphsurgeon as gs

from .errors import BadInputError, OnnxSlimError
from .graph import LoadedModel, iter_graphs
from .gs_bridge import import_graph, quiet_graphsurgeon

__all__ = ["validate_graph", "validate_input"]


def validate_graph(graph: gs.Graph) -> None:
    """Cheap structural check run after every pass: no duplicate names, no cycles, no dangling inputs."""
    try:
        graph.toposort(recurse_subgraphs=True, recurse_functions=False)
    except Exception as e:
        raise ValueError(f"graph is not a DAG: {e}") from e
    _check_scope(graph, set())


def _check_scope(graph: gs.Graph, outer: set[str]) -> None:
    names: dict[str, Any] = {}
    available = set(outer)
    available.update(t.name for t in graph.inputs)
    for node in graph.nodes:
        for t in node.inputs:
            if t.name and not isinstance(t, gs.Constant) and t.name not in available:
                raise ValueError(f"node '{node.name}' ({node.op}) reads '{t.name}', which nothing produces")
        for attr in node.attrs.values():
            for sub in attr if isinstance(attr, (list, tuple)) else [attr]:
                if isinstance(sub, gs.Graph):
                    _check_scope(sub, available)
        for t in node.outputs:
            if t.name in names and names[t.name] is not node:
                raise ValueError(f"tensor '{t.name}' is produced by two nodes ('{names[t.name].name}', '{node.name}')")
            names[t.name] = node
            available.add(t.name)
    for t in graph.outputs:
        if t.name not in available and not isinstance(t, gs.Constant):
            raise ValueError(f"graph output '{t.name}' is not produced by any node")


def _types_conflict(a: onnx.TypeProto, b: onnx.TypeProto) -> bool:
    """Two declarations of one tensor that cannot both hold (a missing shape or dim is no conflict)."""
    if not (a.HasField("tensor_type") and b.HasField("tensor_type")):
        return False
    ta, tb = a.tensor_type, b.tensor_type
    if ta.elem_type and tb.elem_type and ta.elem_type != tb.elem_type:
        return True
    if not (ta.HasField("shape") and tb.HasField("shape")):
        return False
    if len(ta.shape.dim) != len(tb.shape.dim):
        return True
    return any(x.dim_value and y.dim_value and x.dim_value != y.dim_value for x, y in zip(ta.shape.dim, tb.shape.dim))


def validate_input(loaded: LoadedModel) -> gs.Graph:
    """The input model as a graph, refused with one line (BadInputError) when it is not a valid model:
    an opset newer than this onnx knows, duplicate graph outputs, a cycle, a tensor nothing produces, or
    structure graphsurgeon cannot read."""
    where = loaded.path or "the model"
    known = onnx.defs.onnx_opset_version()
    for o in loaded.proto.opset_import:
        if o.domain in ("", "ai.onnx") and not 1 <= o.version <= known:
            raise BadInputError(
                f"{where} imports ai.onnx opset {o.version}, which does not exist (this onnx knows 1..{known}); "
                "re-export it with a real opset"
            )
    for g in iter_graphs(loaded.proto.graph):
        names = [o.name for o in g.output]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise BadInputError(f"{where} lists graph output(s) {', '.join(map(repr, dup))} twice; re-export it")
        inputs = {i.name: i.type for i in g.input}
        for o in g.output:
            if o.name in inputs and _types_conflict(o.type, inputs[o.name]):
                raise BadInputError(
                    f"{where} declares '{o.name}' as a graph input and a graph output with different types; "
                    "re-export it"
                )
    try:
        with quiet_graphsurgeon():
            graph = import_graph(loaded)
            validate_graph(graph)
    except OnnxSlimError:
        raise
    except Exception as e:  # noqa: BLE001 - malformed protos fail in many ways inside onnx/graphsurgeon
        msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        raise BadInputError(f"{where} is not a valid model ({msg}); fix or re-export it") from None
    return graph
