"""Shape inference on a graphsurgeon graph without reading its weights (for passes of any family).

``export_weightless`` exports the graph with every constant larger than a few KB reduced to its dims and
dtype (the proto stays small, models over 2 GB included, and no external weight is read);
``infer_graph_types`` runs ``onnx.shape_inference`` (data propagation on, strict mode off) on that export.
"""

from __future__ import annotations

import logging

import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from .graph import iter_graphs
from .graph_edit import constant_nbytes
from .gs_bridge import export_standalone

__all__ = ["Dims", "export_weightless", "infer_graph_types"]

log = logging.getLogger(__name__)

# Constants up to this size keep their data in the inference copy: shape inputs (Reshape, Expand, Slice
# starts...) are tiny, and data propagation needs their values.
_KEEP_DATA_BYTES = 4096

Dims = list  # list[int | str | None]


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
                external = (
                    isinstance(t._values, LazyValues) and t._values.tensor.data_location == onnx.TensorProto.EXTERNAL
                )
                try:
                    big = external or constant_nbytes(t) > _KEEP_DATA_BYTES
                except Exception:  # noqa: BLE001 - exotic dtype: keep as is
                    big = False
                if big:
                    swapped.append((t, t._values))
                    t._values = _stub(t)
    try:
        return export_standalone(graph, opset)
    finally:
        for t, v in swapped:
            t._values = v


def infer_graph_types(
    graph: gs.Graph, opset: int, *, keep_value_info: bool = True, data_prop: bool = True
) -> dict[str, tuple[int, Dims | None]]:
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
    for prop in (True, False) if data_prop else (False,):
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
