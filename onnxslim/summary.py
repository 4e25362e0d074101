"""Facts about a model, read from the proto without loading external weights."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from .graph import iter_graphs, iter_tensor_protos, tensor_nbytes

__all__ = ["ModelSummary", "summarize"]

_STANDARD_DOMAINS = {"", "ai.onnx"}


@dataclass
class ModelSummary:
    nodes: int = 0
    op_types: dict[str, int] = field(default_factory=dict)
    params: int = 0
    initializer_bytes: int = 0
    initializers: int = 0
    file_size: int | None = None
    subgraphs: int = 0
    functions: int = 0
    opsets: dict[str, int] = field(default_factory=dict)
    custom_domains: list[str] = field(default_factory=list)
    ir_version: int = 0
    inputs: list[dict] = field(default_factory=list)
    outputs: list[dict] = field(default_factory=list)
    external_data: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelSummary:
        return cls(**d)


def _io(vi: onnx.ValueInfoProto) -> dict:
    t = vi.type
    if not t.HasField("tensor_type"):
        return {"name": vi.name, "dtype": t.WhichOneof("value") or "unknown", "shape": None}
    tt = t.tensor_type
    dtype = onnx.TensorProto.DataType.Name(tt.elem_type).lower() if tt.elem_type else "unknown"
    shape = None
    if tt.HasField("shape"):
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
    return {"name": vi.name, "dtype": dtype, "shape": shape}


def _op_key(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in _STANDARD_DOMAINS else f"{node.domain}::{node.op_type}"


def summarize(model: onnx.ModelProto, file_size: int | None = None) -> ModelSummary:
    ops: Counter[str] = Counter()
    graphs = list(iter_graphs(model.graph))
    for g in graphs:
        ops.update(_op_key(n) for n in g.node)
    for fn in model.functions:
        ops.update(_op_key(n) for n in fn.node)
    params = 0
    nbytes = 0
    count = 0
    external = False
    for t in iter_tensor_protos(model):
        params += int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1
        nbytes += tensor_nbytes(t)
        count += 1
        external = external or t.data_location == onnx.TensorProto.EXTERNAL
    domains = sorted(
        {o.domain for o in model.opset_import if o.domain not in _STANDARD_DOMAINS}
        | {n.domain for g in graphs for n in g.node if n.domain not in _STANDARD_DOMAINS}
    )
    inits = {t.name for t in model.graph.initializer}
    return ModelSummary(
        nodes=sum(ops.values()),
        op_types=dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        params=params,
        initializer_bytes=nbytes,
        initializers=count,
        file_size=file_size,
        subgraphs=len(graphs) - 1,
        functions=len(model.functions),
        opsets={(o.domain or "ai.onnx"): o.version for o in model.opset_import},
        custom_domains=domains,
        ir_version=model.ir_version,
        inputs=[_io(v) for v in model.graph.input if v.name not in inits],
        outputs=[_io(v) for v in model.graph.output],
        external_data=external,
    )
