"""infer_shapes: annotate intermediate tensors with the dtype and shape ONNX shape inference finds.

Runs ``onnx.shape_inference.infer_shapes`` (data propagation on, strict mode off) on a weight-free export
of the graph: every constant larger than a few KB is exported with its dims and dtype but no data, so the
proto stays small (models over 2 GB included) and no external weight is read. Inferred types are written
back onto the graphsurgeon Variables of every graph (subgraphs included). Graph inputs and outputs of every
graph keep exactly the types and dim names they had; dims inference only knows as ``unk__N`` are left
unnamed. Inside Loop/Scan bodies only dtypes are written: onnx infers a body from the first iteration's
shapes, and a loop-carried value may change shape per iteration. Ops of unknown or custom domains are skipped by onnx quietly. Exact: only annotations change.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxslim.graph import ModelContract, iter_graphs, tensor_nbytes
from onnxslim.gs_bridge import export_graph
from onnxslim.pass_base import Pass, PassContext, PassResult

__all__ = ["InferShapes", "infer_graph_types"]

log = logging.getLogger(__name__)

# Constants up to this size keep their data in the inference copy: shape inputs (Reshape, Expand, Slice
# starts...) are tiny, and data propagation needs their values.
_KEEP_DATA_BYTES = 4096

Dims = list  # list[int | str | None]


def _const_nbytes(t: gs.Constant) -> int:
    v = t._values
    if isinstance(v, LazyValues):
        return tensor_nbytes(v.tensor)
    return int(getattr(v, "nbytes", 0))


def _stub(t: gs.Constant) -> LazyValues:
    """Lazy values with the constant's dims and dtype but no payload."""
    v = t._values
    if isinstance(v, LazyValues):
        dims, dtype = list(v.tensor.dims), v.tensor.data_type
    else:
        dims, dtype = list(v.shape), onnx.helper.np_dtype_to_tensor_dtype(v.dtype)
    proto = onnx.TensorProto(name=t.name, data_type=dtype, dims=dims)
    return LazyValues(proto)


def export_weightless(graph: gs.Graph, opset: int) -> onnx.ModelProto:
    """The graph as a model whose large constants carry dims and dtype only (restored afterwards)."""
    swapped: list[tuple[gs.Constant, object]] = []
    seen: set[int] = set()
    for g in iter_graphs(graph):
        for t in g.tensors().values():
            if isinstance(t, gs.Constant) and id(t) not in seen:
                seen.add(id(t))
                external = isinstance(t._values, LazyValues) and \
                    t._values.tensor.data_location == onnx.TensorProto.EXTERNAL
                try:
                    big = external or _const_nbytes(t) > _KEEP_DATA_BYTES
                except Exception:  # noqa: BLE001 - exotic dtype: keep as is
                    big = False
                if big:
                    swapped.append((t, t._values))
                    t._values = _stub(t)
    opsets = [onnx.helper.make_opsetid(d.domain, d.version) for d in (graph.import_domains or [])]
    if not opsets:
        opsets = [onnx.helper.make_opsetid("", opset)]
    try:
        ir = max(7, onnx.helper.find_min_ir_version_for(opsets, ignore_unknown=True))
    except Exception:  # noqa: BLE001 - unknown domains
        ir = onnx.IR_VERSION
    contract = ModelContract(inputs=[], outputs=[], ir_version=ir, opset_import=opsets, producer_name="",
                             producer_version="", domain="", model_version=0, doc_string="",
                             graph_name=graph.name, graph_doc_string="", metadata_props=[])
    try:
        return export_graph(graph, contract)
    finally:
        for t, v in swapped:
            t._values = v


def infer_graph_types(graph: gs.Graph, opset: int, *, keep_value_info: bool = True,
                      data_prop: bool = True) -> dict[str, tuple[int, Dims | None]]:
    """name -> (onnx elem type, dims) for every tensor-typed value inference knows, in all graphs.

    ``keep_value_info=False`` drops the annotations already in the graph first, so the result rests on
    the graph inputs' declared types and the ops alone (what a folding pass may trust).
    """
    model = export_weightless(graph, opset)
    if not keep_value_info:
        for g in iter_graphs(model.graph):
            del g.value_info[:]
            for vi in g.output:  # a declared output shape is not evidence either
                if vi.type.WhichOneof("value") == "tensor_type":
                    vi.type.tensor_type.ClearField("shape")
    inferred = None
    for prop in ((True, False) if data_prop else (False,)):
        try:
            inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=prop)
            break
        except Exception as e:  # noqa: BLE001 - onnx raises several types for ops it cannot infer
            log.debug("shape inference (data_prop=%s) failed: %s", prop, e)
    if inferred is None:
        return {}
    out: dict[str, tuple[int, Dims | None]] = {}
    for g in iter_graphs(inferred.graph):
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            if vi.type.WhichOneof("value") != "tensor_type" or vi.name in out:
                continue
            tt = vi.type.tensor_type
            dims: Dims | None = None
            if tt.HasField("shape"):
                dims = []
                for d in tt.shape.dim:
                    if d.HasField("dim_value"):
                        dims.append(int(d.dim_value))
                    elif d.HasField("dim_param") and not d.dim_param.startswith("unk__"):
                        dims.append(d.dim_param)
                    else:
                        dims.append(None)
            out[vi.name] = (int(tt.elem_type), dims)
    return out


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
