"""share_identical_weights: store each distinct constant once, of any size, across all graphs.

Constants (initializers, and Constant nodes with a ``value`` tensor) are grouped by dtype, shape and a
BLAKE2b digest of their bytes; a digest match is then verified byte for byte before any merge. Readers of a
duplicate are pointed at the kept tensor and the duplicate disappears: ``W == W'`` (bitwise) implies
``f(W) == f(W')``, so this is exact.

Scope: ONNX lets a subgraph read an outer graph's value by name, not the reverse. The kept copy is the one
defined in the outermost graph. An initializer can serve readers anywhere (export stores it once, in the
closest graph enclosing all its readers); a Constant node serves only its own graph and those below it, so
identical Constant nodes in sibling subgraphs (e.g. both If branches) are shared by moving one of them into
the closest graph enclosing all of them. Graph outputs keep their names.

Speed: tensors of equal dtype and shape are first hashed on their first 64 KiB only; the full hash runs
only for tensors whose prefixes collide. Memory: tensors are hashed one at a time, straight from their raw
bytes or, for external data, in
chunks from the data file; only digests are kept. Unlike OnnxSlim (< 1,000 elements) there is no size cap.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxslim.graph import external_path
from onnxslim.graph_edit import constant_nbytes, peek_values, replace_input
from onnxslim.pass_base import Pass, PassContext, PassResult

__all__ = ["ShareIdenticalWeights"]

log = logging.getLogger(__name__)

_CHUNK = 4 * 2**20
# Hash this many leading bytes first: distinct weights almost always differ there, so only tensors whose
# prefixes collide pay for a full hash (and the byte-for-byte check).
_PREFIX = 64 * 2**10


# ------------------------------------------------------------------------------------------- bytes
def _chunks(c: gs.Constant, base_dir: Path | None, limit: int | None = None) -> Iterator[bytes | memoryview]:
    """The constant's little-endian payload (its first ``limit`` bytes if given), in chunks, without
    materializing external data."""
    values = c._values
    if isinstance(values, LazyValues):
        t = values.tensor
        if t.HasField("data_location") and t.data_location == TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            folder = getattr(values, "base_dir", None) or base_dir or Path(".")
            length = int(info["length"]) if "length" in info else int(values.nbytes)
            if limit is not None:
                length = min(length, limit)
            with open(external_path(folder, info.get("location", ""), t.name), "rb") as f:
                f.seek(int(info.get("offset", 0)))
                while length > 0:
                    chunk = f.read(min(length, _CHUNK))
                    if not chunk:
                        break
                    length -= len(chunk)
                    yield chunk
            return
        if t.HasField("raw_data") or t.raw_data:
            yield memoryview(t.raw_data)[:limit]
            return
    arr = np.ascontiguousarray(peek_values(c))
    yield memoryview(arr.reshape(-1).view(np.uint8))[:limit] if arr.size else b""


def _digest(c: gs.Constant, base_dir: Path | None, limit: int | None = None) -> str:
    h = hashlib.blake2b(digest_size=20)
    for chunk in _chunks(c, base_dir, limit):
        h.update(chunk)
    return h.hexdigest()


def _same_bytes(a: gs.Constant, b: gs.Constant, base_dir: Path | None) -> bool:
    """Byte-for-byte comparison, chunk by chunk."""
    ia, ib = _joined(_chunks(a, base_dir)), _joined(_chunks(b, base_dir))
    while True:
        ca, cb = next(ia, None), next(ib, None)
        if ca is None or cb is None:
            return ca is None and cb is None
        if bytes(ca) != bytes(cb):
            return False


def _joined(chunks: Iterator) -> Iterator[bytes]:
    """Re-chunk to a fixed size so two differently chunked streams compare piece by piece."""
    buf = b""
    for c in chunks:
        view = memoryview(c).cast("B")
        pos = 0
        if buf:
            take = min(_CHUNK - len(buf), len(view))
            buf += bytes(view[:take])
            pos = take
            if len(buf) < _CHUNK:
                continue
            yield buf
            buf = b""
        while len(view) - pos >= _CHUNK:
            yield bytes(view[pos : pos + _CHUNK])
            pos += _CHUNK
        buf = bytes(view[pos:])
    if buf:
        yield buf


def _dtype_key(c: gs.Constant) -> str | None:
    values = c._values
    if isinstance(values, LazyValues):
        if values.tensor.data_type == TensorProto.STRING:
            return None
        return f"onnx:{values.tensor.data_type}"
    arr = np.asarray(values)
    if arr.dtype.kind in "OSU":
        return None
    try:
        return f"onnx:{onnx.helper.np_dtype_to_tensor_dtype(arr.dtype)}"
    except Exception:  # noqa: BLE001
        return f"np:{arr.dtype.str}"


# ------------------------------------------------------------------------------------------- scopes
@dataclass
class _Entry:
    """One stored copy: an initializer (tensor used by nodes of some graphs) or a Constant node."""

    tensor: gs.Constant  # the value
    node: gs.Node | None = None  # the Constant node, for node entries
    graph: gs.Graph | None = None  # the node's graph, for node entries
    users: dict = field(default_factory=dict)  # id(graph) -> graph, for initializer entries
    pinned: bool = False  # a graph output: its name must stay


class _Scopes:
    def __init__(self, root: gs.Graph):
        self.parent: dict[int, gs.Graph | None] = {id(root): None}
        self.graphs: dict[int, gs.Graph] = {id(root): root}
        self._walk(root)

    def _walk(self, g: gs.Graph) -> None:
        for node in g.nodes:
            for attr in node.attrs.values():
                for sub in attr if isinstance(attr, (list, tuple)) else [attr]:
                    if isinstance(sub, gs.Graph):
                        self.parent[id(sub)] = g
                        self.graphs[id(sub)] = sub
                        self._walk(sub)

    def chain(self, g: gs.Graph) -> list[gs.Graph]:
        """g and its enclosing graphs, innermost first."""
        out = []
        cur: gs.Graph | None = g
        while cur is not None:
            out.append(cur)
            cur = self.parent[id(cur)]
        return out

    def depth(self, g: gs.Graph) -> int:
        return len(self.chain(g)) - 1

    def under(self, g: gs.Graph, top: gs.Graph) -> bool:
        return any(x is top for x in self.chain(g))

    def common(self, graphs: list[gs.Graph]) -> gs.Graph:
        chains = [self.chain(g) for g in graphs]
        for cand in chains[0]:
            if all(any(c is cand for c in ch) for ch in chains[1:]):
                return cand
        return chains[0][-1]

    def tops(self, graphs: list[gs.Graph]) -> list[gs.Graph]:
        """The graphs of the list that are not below another one (where an initializer gets stored)."""
        return [g for g in graphs if not any(o is not g and self.under(g, o) for o in graphs)]


def _scope_of(e: _Entry, scopes: _Scopes) -> list[gs.Graph]:
    return [e.graph] if e.node is not None else scopes.tops(list(e.users.values()))


def _reader_graphs(e: _Entry) -> list[gs.Graph]:
    if e.node is not None:
        return [e.graph]
    return list(e.users.values())


# ------------------------------------------------------------------------------------------- the pass
class ShareIdenticalWeights(Pass):
    """Merge bit-identical initializers and Constant nodes of any size, across the graph and its subgraphs."""

    name = "share_identical_weights"

    @dataclass
    class Options:
        min_bytes: int = field(
            default=0, metadata={"help": "leave constants smaller than this many bytes alone (0: share all)"}
        )

    def run(self, ctx: PassContext) -> PassResult:
        result = PassResult()
        scopes = _Scopes(ctx.graph)
        entries = self._collect(scopes)
        # Group by dtype/shape/size first (free), and hash only tensors that have a possible twin.
        by_meta: dict[tuple, list[_Entry]] = {}
        for e in entries:
            dkey = _dtype_key(e.tensor)
            if dkey is None or constant_nbytes(e.tensor) < self.options.min_bytes:
                continue
            by_meta.setdefault((dkey, tuple(e.tensor.shape)), []).append(e)
        for group in by_meta.values():
            if len(group) < 2:
                continue
            by_prefix: dict[str, list[_Entry]] = {}
            for e in group:
                by_prefix.setdefault(_digest(e.tensor, ctx.base_dir, _PREFIX), []).append(e)
            for candidates in by_prefix.values():
                if len(candidates) < 2:
                    continue
                if constant_nbytes(candidates[0].tensor) <= _PREFIX:
                    by_digest = {"": candidates}  # the prefix was the whole tensor
                else:
                    by_digest = {}
                    for e in candidates:
                        by_digest.setdefault(_digest(e.tensor, ctx.base_dir), []).append(e)
                for same in by_digest.values():
                    if len(same) > 1:
                        self._share(same, scopes, ctx, result)
        result.modified = result.stats.get("tensors_merged", 0) > 0
        return result

    def _collect(self, scopes: _Scopes) -> list[_Entry]:
        inits: dict[int, _Entry] = {}
        nodes: list[_Entry] = []
        pinned: set[int] = set()
        for g in scopes.graphs.values():
            pinned.update(id(t) for t in g.outputs)
        for g in scopes.graphs.values():
            for node in g.nodes:
                for t in node.inputs:
                    if isinstance(t, gs.Constant):
                        e = inits.setdefault(id(t), _Entry(t))
                        e.users[id(g)] = g
                value = node.attrs.get("value")
                if (
                    node.op == "Constant"
                    and node.domain in (None, "", "ai.onnx")
                    and len(node.attrs) == 1
                    and isinstance(value, gs.Constant)
                    and len(node.outputs) == 1
                ):
                    nodes.append(_Entry(value, node=node, graph=g, pinned=id(node.outputs[0]) in pinned))
            for t in g.outputs:
                if isinstance(t, gs.Constant):
                    e = inits.setdefault(id(t), _Entry(t))
                    e.pinned = True
                    e.users[id(g)] = g
        return list(inits.values()) + nodes

    def _share(self, same: list[_Entry], scopes: _Scopes, ctx: PassContext, result: PassResult) -> None:
        # Keep the copy stored in the outermost graph; initializers before Constant nodes on ties.
        def rank(e: _Entry) -> tuple:
            scope = _scope_of(e, scopes)
            return (min(scopes.depth(g) for g in scope) if scope else 99, e.node is not None, not e.pinned)

        # A subgraph's output must be defined inside that subgraph: such a constant is neither merged
        # nor kept for others (readers elsewhere would move it out of its graph on export).
        same = sorted((e for e in same if not (e.pinned and _is_subgraph_output(e, scopes))), key=rank)
        if len(same) < 2:
            return
        keeper = same[0]
        rest = same[1:]
        if keeper.node is not None:
            # Only Constant nodes (or nodes + initializers read below them): if readers of the others sit in
            # sibling scopes, move the kept node to the closest graph enclosing them all.
            target = scopes.common([g for e in same for g in _reader_graphs(e)])
            if target is not keeper.graph and not keeper.pinned and all(not e.pinned for e in rest):
                self._move_node(keeper, target)
        keep_scope = _scope_of(keeper, scopes)
        kept_value = keeper.node.outputs[0] if keeper.node is not None else keeper.tensor
        for e in rest:
            if e.pinned:
                continue
            readers = _reader_graphs(e)
            # An initializer may be read from anywhere: export stores it once, in the closest graph enclosing
            # all its readers. A Constant node's value is visible only in its own graph and below.
            if keeper.node is not None and not all(any(scopes.under(g, top) for top in keep_scope) for g in readers):
                log.debug("not sharing %s: read outside the kept copy's scope", e.tensor.name)
                continue
            if not _same_bytes(keeper.tensor, e.tensor, ctx.base_dir):
                continue  # digest collision: never merge on a hash alone
            if e.node is None and keeper.node is None and e.tensor.name == keeper.tensor.name:
                # One tensor split in two objects (graphsurgeon's Graph.copy does this for constants read in
                # subgraphs): join them, but it is the same stored tensor, so nothing is saved or changed.
                self._redirect(e, kept_value, scopes)
                keeper.users.update(e.users)
                continue
            saved = constant_nbytes(e.tensor) * (1 if e.node is not None else len(scopes.tops(readers)))
            self._redirect(e, kept_value, scopes)
            if keeper.node is None:
                keeper.users.update(e.users)
            result.count("tensors_merged")
            result.count("bytes_saved", saved)

    @staticmethod
    def _move_node(e: _Entry, target: gs.Graph) -> None:
        node = e.node
        e.graph.nodes = [n for n in e.graph.nodes if n is not node]
        target.nodes.insert(0, node)  # a Constant has no inputs, so first is always a valid position
        e.graph = target

    @staticmethod
    def _redirect(e: _Entry, kept_value: gs.Tensor, scopes: _Scopes) -> None:
        old = e.node.outputs[0] if e.node is not None else e.tensor
        # Tensor objects are shared between a graph and its subgraphs, so old.outputs lists every reader.
        for consumer in list(old.outputs):
            replace_input(consumer, old, kept_value)
        if e.node is not None:
            node = e.node
            node.outputs.clear()
            e.graph.nodes = [n for n in e.graph.nodes if n is not node]


def _is_subgraph_output(e: _Entry, scopes: _Scopes) -> bool:
    value = e.node.outputs[0] if e.node is not None else e.tensor
    return any(
        scopes.parent[gid] is not None and any(t is value for t in g.outputs) for gid, g in scopes.graphs.items()
    )
