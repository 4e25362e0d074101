"""infer_shapes: annotate intermediate tensors with the dtype and shape ONNX shape inference finds.

Runs ``onnx.shape_inference.infer_shapes`` (data propagation on, strict mode off) on a weight-free export
of the graph: every constant larger than a few KB is exported with its dims and dtype but no data, so the
proto stays small (models over 2 GB included) and no external weight is read. Inferred types are written
back onto the graphsurgeon Variables of every graph (subgraphs included). Graph inputs and outputs of every
graph keep exactly the types and dim names they had; dims inference only knows as ``unk__N`` are left
unnamed. Inside Loop/Scan bodies only dtypes are written: onnx infers a body from the first iteration's
shapes, and a loop-carried value may change shape per iteration. Ops of unknown or custom domains are skipped
by onnx quietly. Exact: only annotations change.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxslim.pass_base import Pass, PassContext, PassResult
from onnxslim.shape_inference import Dims, infer_graph_types

__all__ = ["InferShapes"]

log = logging.getLogger(__name__)


def _np_dtype(elem: int):
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem))
    except Exception:  # noqa: BLE001 - bfloat16/float8 have no plain numpy dtype
        return None


class InferShapes(Pass):
    """Annotate intermediate tensors with inferred dtypes and shapes (graph I/O types untouched)."""

    name = "infer_shapes"

    @dataclass
    class Options:
        data_prop: bool = field(default=True, metadata={"help": "propagate shape values (Shape->Gather->Reshape)"})

    def run(self, ctx: PassContext) -> PassResult:
        result = PassResult()
        types = infer_graph_types(ctx.graph, ctx.opset, data_prop=self.options.data_prop)
        if not types:
            result.notes.append("shape inference found nothing (or failed); graph left as it was")
            return result
        for g, trusted in _graphs(ctx.graph, True):
            fixed = {id(t) for t in list(g.inputs) + list(g.outputs)}
            for node in g.nodes:
                for t in node.outputs:
                    if not isinstance(t, gs.Variable) or isinstance(t, gs.Constant) or id(t) in fixed:
                        continue
                    if t.name not in types or getattr(t, "type", "tensor_type") != "tensor_type":
                        continue
                    elem, dims = types[t.name]
                    changed = False
                    dtype = _np_dtype(elem) if elem else None
                    if dtype is not None and t.dtype is None:
                        t.dtype = dtype
                        changed = True
                    # Loop/Scan bodies are inferred from the first iteration's shapes: dtype only there.
                    if trusted and dims is not None and _better(dims, t.shape):
                        t.shape = dims
                        changed = True
                    if changed:
                        result.count("tensors_annotated")
                        result.modified = True
        return result


def _graphs(graph: gs.Graph, trusted: bool):
    """Every graph with whether its inferred shapes hold (False inside Loop/Scan bodies)."""
    yield graph, trusted
    for node in graph.nodes:
        for attr in node.attrs.values():
            for sub in attr if isinstance(attr, (list, tuple)) else [attr]:
                if isinstance(sub, gs.Graph):
                    yield from _graphs(sub, trusted and node.op == "If")


def _better(new: Dims, old: Dims | None) -> bool:
    """Whether ``new`` says more than ``old`` (and never contradicts a known dim)."""
    if old is None:
        return True
    if len(new) != len(old) or list(new) == list(old):
        return False
    for a, b in zip(new, old):
        if isinstance(b, int) and a != b:
            return False
        if isinstance(b, str) and not isinstance(a, int) and a != b:
            return False
    return any(b is None and a is not None or isinstance(b, str) and isinstance(a, int) for a, b in zip(new, old))
