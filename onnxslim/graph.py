"""Model I/O that keeps the model's contract.

Loading never pulls external weights into memory: tensors keep their external references and are read
one at a time, only when a pass asks for values. Saving (``model_save``) streams external tensors from their
source file into the output's data file, and replaces the pair atomically.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError
from onnx import TensorProto

from .errors import BadInputError

__all__ = [
    "LoadedModel",
    "ModelContract",
    "load_model",
    "check_model",
    "iter_graphs",
    "iter_tensor_protos",
    "tensor_nbytes",
    "PROTOBUF_LIMIT",
    "external_path",
]

log = logging.getLogger(__name__)

# Protobuf cannot serialize a message of 2 GiB or more; stay well below it.
PROTOBUF_LIMIT = 2**31 - 2**26
_COPY_CHUNK = 16 * 2**20


# ---------------------------------------------------------------------------------------------- walking
def iter_graphs(graph: onnx.GraphProto | gs.Graph, *, functions: bool = False) -> Iterator:
    """The graph, then every subgraph (If/Loop/Scan bodies) below it, depth first, in node order.

    The one walker over graphs, for protos (``onnx.GraphProto``) and graphsurgeon graphs alike;
    ``functions`` adds the bodies of a graphsurgeon graph's model-local functions (and their subgraphs).
    """
    yield graph
    if isinstance(graph, onnx.GraphProto):
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    yield from iter_graphs(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        yield from iter_graphs(g)
        return
    for node in list(graph.nodes):
        for attr in node.attrs.values():
            for sub in attr if isinstance(attr, (list, tuple)) else [attr]:
                if isinstance(sub, gs.Graph):
                    yield from iter_graphs(sub)
    if functions:
        for fn in getattr(graph, "functions", []) or []:
            yield from iter_graphs(fn)


def iter_tensor_protos(model: onnx.ModelProto, *, constants: bool = True) -> Iterator[TensorProto]:
    """Every stored tensor: initializers of all graphs and, optionally, Constant-node / attribute tensors."""
    for g in iter_graphs(model.graph):
        yield from g.initializer
        if constants:
            for node in g.node:
                for attr in node.attribute:
                    if attr.type == onnx.AttributeProto.TENSOR:
                        yield attr.t
    for fn in model.functions:
        for node in fn.node:
            for attr in node.attribute:
                if constants and attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t


def _is_external(t: TensorProto) -> bool:
    return t.HasField("data_location") and t.data_location == TensorProto.EXTERNAL


def _external_info(t: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def tensor_nbytes(t: TensorProto) -> int:
    """Bytes of a tensor's payload, computed from dims and dtype (no data is read)."""
    n = int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1
    if t.data_type in (TensorProto.STRING,):
        return sum(len(s) for s in t.string_data)
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except Exception:  # exotic types (float8, int4): count one byte per element
        itemsize = 1
    if t.data_type in (TensorProto.INT4, TensorProto.UINT4):
        return (n + 1) // 2
    return n * itemsize


# ---------------------------------------------------------------------------------------------- contract
def _value_info_key(vi: onnx.ValueInfoProto) -> dict:
    t = vi.type
    if t.HasField("tensor_type"):
        dims = []
        if t.tensor_type.HasField("shape"):
            for d in t.tensor_type.shape.dim:
                dims.append(
                    d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else None)
                )
        else:
            dims = None
        return {"name": vi.name, "elem_type": int(t.tensor_type.elem_type), "shape": dims}
    return {"name": vi.name, "type": t.WhichOneof("value")}


@dataclass
class ModelContract:
    """What a user of the model relies on: I/O names, dtypes, dim params, IR version, opsets, metadata."""

    inputs: list[onnx.ValueInfoProto]
    outputs: list[onnx.ValueInfoProto]
    ir_version: int
    opset_import: list[onnx.OperatorSetIdProto]
    producer_name: str
    producer_version: str
    domain: str
    model_version: int
    doc_string: str
    graph_name: str
    graph_doc_string: str
    metadata_props: list[tuple[str, str]]

    @classmethod
    def of(cls, model: onnx.ModelProto) -> ModelContract:
        inits = {t.name for t in model.graph.initializer}
        return cls(
            # IR < 4 lists initializers among inputs; they are not part of the caller's contract.
            inputs=[copy.deepcopy(i) for i in model.graph.input if i.name not in inits],
            outputs=[copy.deepcopy(o) for o in model.graph.output],
            ir_version=model.ir_version,
            opset_import=[copy.deepcopy(o) for o in model.opset_import],
            producer_name=model.producer_name,
            producer_version=model.producer_version,
            domain=model.domain,
            model_version=model.model_version,
            doc_string=model.doc_string,
            graph_name=model.graph.name,
            graph_doc_string=model.graph.doc_string,
            metadata_props=[(p.key, p.value) for p in model.metadata_props],
        )

    def describe(self) -> dict:
        return {
            "inputs": [_value_info_key(v) for v in self.inputs],
            "outputs": [_value_info_key(v) for v in self.outputs],
            "ir_version": self.ir_version,
            "opset_import": {o.domain or "ai.onnx": o.version for o in self.opset_import},
            "producer": [self.producer_name, self.producer_version],
            "metadata_props": dict(self.metadata_props),
        }

    def restore(self, model: onnx.ModelProto, *, keep_opsets_added: bool = False) -> None:
        """Write the contract back onto an exported model: metadata, opsets, and I/O types.

        I/O types are restored exactly (dim names included) for every input/output that still exists
        under the same name; shape inference may have made them more concrete or renamed dims.
        """
        model.ir_version = self.ir_version
        model.producer_name = self.producer_name
        model.producer_version = self.producer_version
        model.domain = self.domain
        model.model_version = self.model_version
        model.doc_string = self.doc_string
        model.graph.name = self.graph_name
        model.graph.doc_string = self.graph_doc_string
        del model.metadata_props[:]
        for k, v in self.metadata_props:
            model.metadata_props.add(key=k, value=v)
        used = {o.domain: o.version for o in model.opset_import}
        original = {o.domain: o.version for o in self.opset_import}
        del model.opset_import[:]
        for o in self.opset_import:
            model.opset_import.append(copy.deepcopy(o))
        if keep_opsets_added:
            for dom, ver in used.items():
                if dom not in original:
                    model.opset_import.add(domain=dom, version=ver)
        by_name = {v.name: v for v in self.inputs + self.outputs}
        for vi in list(model.graph.input) + list(model.graph.output):
            if vi.name in by_name and by_name[vi.name].type.WhichOneof("value"):
                vi.type.CopyFrom(by_name[vi.name].type)
                if by_name[vi.name].doc_string:
                    vi.doc_string = by_name[vi.name].doc_string

    def differences(self, model: onnx.ModelProto) -> list[str]:
        """Ways the model breaks this contract (empty when kept)."""
        other = ModelContract.of(model)
        problems = []
        mine, theirs = self.describe(), other.describe()
        for key in ("inputs", "outputs", "ir_version", "opset_import", "producer", "metadata_props"):
            if mine[key] != theirs[key]:
                problems.append(f"{key}: {mine[key]!r} -> {theirs[key]!r}")
        return problems


# ---------------------------------------------------------------------------------------------- loading
@dataclass
class LoadedModel:
    """A model proto with external tensors left on disk, plus where they live."""

    proto: onnx.ModelProto
    path: Path | None = None
    base_dir: Path | None = None
    file_size: int = 0
    has_external_data: bool = False
    external_files: list[str] = field(default_factory=list)

    @property
    def contract(self) -> ModelContract:
        return ModelContract.of(self.proto)


def _fix_hint_for_decode(path: Path, size: int) -> str:
    if size == 0:
        return f"{path} is empty; re-export or re-copy the model"
    return (
        f"{path} is not a readable ONNX model (corrupt or truncated protobuf, {size} bytes); "
        "re-export it or copy it again, and check that it is an .onnx file and not e.g. a .pt or an LFS pointer"
    )


def load_model(source: str | os.PathLike | onnx.ModelProto | LoadedModel, *, copy_proto: bool = True) -> LoadedModel:
    """Load a model without reading external data; validate that every external file is present.

    A ModelProto is deep-copied unless ``copy_proto=False``, so the caller's object is never mutated.
    """
    if isinstance(source, LoadedModel):
        return source
    if isinstance(source, onnx.ModelProto):
        proto = copy.deepcopy(source) if copy_proto else source
        _check_structure(proto, "the model")
        ext = any(_is_external(t) for t in iter_tensor_protos(proto))
        return LoadedModel(proto=proto, has_external_data=ext, file_size=0)
    if not isinstance(source, (str, os.PathLike)):
        raise BadInputError(f"expected a path or an onnx.ModelProto, got {type(source).__name__}")
    path = Path(source)
    if not path.exists():
        raise BadInputError(f"model file not found: {path}; check the path")
    if path.is_dir():
        raise BadInputError(f"{path} is a directory; pass the .onnx file inside it")
    size = path.stat().st_size
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise BadInputError(_fix_hint_for_decode(path, size)) from e
    if size == 0 or (not proto.graph.node and not proto.graph.output and not proto.opset_import):
        raise BadInputError(_fix_hint_for_decode(path, size))
    _check_structure(proto, path)
    base = path.resolve().parent
    files = _check_external_files(proto, base, path)
    return LoadedModel(
        proto=proto,
        path=path,
        base_dir=base,
        file_size=size,
        has_external_data=bool(files),
        external_files=sorted(files),
    )


def external_path(base_dir: Path, location: str, tensor: str, model: object = None) -> Path:
    """The real path of an external-data file; it must resolve (symlinks followed) inside the model's folder.

    The one confinement check: every read of external data goes through it, so neither ``..``, an absolute
    path, nor a link out of the folder can make a model read (and copy into our output) another file.
    """
    where = f" in {model}" if model else ""
    if not location or os.path.isabs(location) or ".." in Path(location).parts:
        raise BadInputError(
            f"tensor '{tensor}'{where} points to external data at an unsafe location {location!r}; "
            "re-save the model with its data file next to it"
        )
    base = Path(os.path.realpath(base_dir))
    real = Path(os.path.realpath(base / location))
    if base not in real.parents:
        raise BadInputError(
            f"tensor '{tensor}'{where} points to external data {location!r}, which resolves to {real}, outside "
            f"the model's folder {base}; copy the data file itself (not a link) next to the model"
        )
    return real


_KNOWN_TYPES = set(TensorProto.DataType.values())


def _bad_string(msg, where: str = "") -> str | None:
    """Where the first string field that is not valid UTF-8 sits (protobuf decodes strings on access)."""
    try:
        fields = msg.ListFields()
        for fd, value in fields:
            name = f"{where}.{fd.name}" if where else fd.name
            repeated = fd.is_repeated
            if fd.type == fd.TYPE_MESSAGE:
                for i, item in enumerate(value if repeated else [value]):
                    found = _bad_string(item, f"{name}[{i}]" if repeated else name)
                    if found:
                        return found
            elif fd.type == fd.TYPE_STRING and any(isinstance(v, bytes) for v in (value if repeated else [value])):
                return name  # protobuf hands back bytes for a string it cannot decode
    except UnicodeDecodeError:
        return where or msg.DESCRIPTOR.name
    return None


def _check_structure(proto: onnx.ModelProto, where) -> None:
    """Refuse, with one line, what onnx and graphsurgeon would crash on later: non-UTF-8 strings, unknown types."""
    found = _bad_string(proto)
    if found:
        raise BadInputError(
            f"{where}: a text field ({found}) is not valid UTF-8, so the file is corrupt; re-export or re-copy it"
        )
    for g in iter_graphs(proto.graph):
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type not in _KNOWN_TYPES:
                raise BadInputError(
                    f"{where}: value '{vi.name}' has element type {vi.type.tensor_type.elem_type}, which ONNX does "
                    "not define; the file is corrupt, re-export it"
                )
    for t in iter_tensor_protos(proto):
        if t.data_type not in _KNOWN_TYPES or t.data_type == TensorProto.UNDEFINED:
            raise BadInputError(
                f"{where}: tensor '{t.name}' has data type {t.data_type}, which ONNX does not define; "
                "the file is corrupt, re-export it"
            )


def _check_external_files(proto: onnx.ModelProto, base: Path, path: Path) -> set[str]:
    files: dict[str, int] = {}
    for t in iter_tensor_protos(proto):
        if not _is_external(t):
            continue
        info = _external_info(t)
        loc = info.get("location", "")
        external_path(base, loc, t.name, path)
        end = int(info.get("offset", 0)) + int(info.get("length", tensor_nbytes(t)))
        files[loc] = max(files.get(loc, 0), end)
    for loc, end in files.items():
        f = base / loc
        if not f.exists():
            raise BadInputError(
                f"external data file '{loc}' referenced by {path.name} is missing (looked in {base}); "
                "copy it next to the model"
            )
        if not f.is_file():
            raise BadInputError(f"external data '{loc}' referenced by {path.name} is not a file; point it at one")
        if f.stat().st_size < end:
            raise BadInputError(
                f"external data file '{loc}' is truncated ({f.stat().st_size} bytes, tensors need {end}); "
                "copy it again from the source"
            )
    return set(files)


def read_external(t: TensorProto, base_dir: Path | None) -> bytes:
    info = _external_info(t)
    if base_dir is None:
        raise BadInputError(
            f"tensor '{t.name}' has external data but the model's folder is unknown; load it from a path"
        )
    offset = int(info.get("offset", 0))
    length = int(info["length"]) if "length" in info else tensor_nbytes(t)
    with open(external_path(base_dir, info.get("location", ""), t.name), "rb") as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise BadInputError(f"external data for tensor '{t.name}' is truncated; copy the data file again")
    return data


def tensor_to_array(t: TensorProto, base_dir: Path | None) -> np.ndarray:
    """Values of one tensor, reading its external bytes (only this tensor's) when needed."""
    if not _is_external(t):
        return onnx.numpy_helper.to_array(t)
    tmp = TensorProto()
    tmp.CopyFrom(t)
    tmp.ClearField("external_data")
    tmp.data_location = TensorProto.DEFAULT
    tmp.raw_data = read_external(t, base_dir)
    return onnx.numpy_helper.to_array(tmp)


# ---------------------------------------------------------------------------------------------- checking
def check_model(path_or_model: str | os.PathLike | onnx.ModelProto, *, full: bool = True) -> None:
    """onnx.checker on a saved file (handles external data and > 2 GB) or a small in-memory model."""
    target = str(path_or_model) if isinstance(path_or_model, (str, os.PathLike)) else path_or_model
    onnx.checker.check_model(target, full_check=full)
