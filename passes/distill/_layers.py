"""Private helper of distill_layers: which layers can be refit, what their weight is, and how new values go back.

A layer is a Conv, Gemm or MatMul of the main graph (a MatMul with the Add that alone follows it, when that Add
adds a per-output constant: its bias). Its weight is seen as the effective ``[M, K]`` matrix ``W`` of
``y = W x + b`` (M outputs, K input features: Conv patches in the weight's ``(C, k...)`` order, Gemm's ``alpha``
folded in) and its bias as the effective ``b`` (Gemm's ``beta`` folded in). Kinds:

- ``float``: a float constant (dense or pruned: its exact zeros stay zero);
- ``codebook``: share_weights' form, packed (codes + codebook, rebuilt by a Gather / GatherElements chain, maybe
  times channel scales: ``Mul(Reshape(Gather(..)), scales[M, 1])``, the scales kept) or
  dense (a float constant whose non-zero values repeat: at most 3/4 as many distinct ones as entries, and at
  most 256 per tensor or per output row): the codes stay, the centroids move.

A float weight with at most 256 distinct values per tensor or per row is refit through its values too (each
value its own "centroid": the same least squares as refitting the entries one by one, zeros kept), so a dense
codebook the rule above does not recognize still keeps its few values.
- ``int8``: quantize_int8_static's ``DequantizeLinear(int8)`` or ``Mul(Cast(int8), scale)`` (symmetric, one
  scale per output or per tensor): the int8 values move on their own grid (``Int8Weight``), the scales stay, so
  the int32 bias keeps its scale too; another form of int8 weight gets its bias refit only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.calibration_stats import ConvPatches
from onnxslim.graph_edit import GraphEditor, constant_source, is_shared, node_matches, peek_values, producer
from onnxslim.pass_base import PassResult
from onnxslim.weight_layout import conv_patches

__all__ = [
    "Layer",
    "BiasSlot",
    "Codebook",
    "Int8Weight",
    "find_layers",
    "to_rows",
    "from_rows",
    "dense_codebook",
    "codes_for",
]

_FLOATS = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.float64))
_MAX_CENTROIDS = 256


@dataclass(eq=False)
class BiasSlot:
    """Where the layer's bias lives: input ``index`` of ``owner`` (absent: ``create``); effective = ``scale`` *
    stored; ``dq``: the DequantizeLinear holding it as int32 (quantize_int8_static's Conv/Gemm biases)."""

    owner: gs.Node
    index: int
    scale: float = 1.0
    shape: tuple[int, ...] = ()
    dtype: np.dtype = field(default_factory=lambda: np.dtype(np.float32))
    dq: gs.Node | None = None
    create: bool = False

    def read(self, m: int) -> np.ndarray:
        if self.create:
            return np.zeros(m)
        if self.dq is not None:
            q, s, zp = _dq_parts(self.dq)
            return (q.astype(np.float64) - zp) * s * self.scale
        src = constant_source(self.owner.inputs[self.index])
        return np.asarray(peek_values(src.constant), np.float64).reshape(-1) * self.scale

    def write(self, editor: GraphEditor, values: np.ndarray, base: str) -> None:
        stored = np.asarray(values, np.float64) / self.scale
        if self.dq is not None:
            q, s, zp = _dq_parts(self.dq)
            new = np.clip(np.rint(stored / s) + zp, -(2**31), 2**31 - 1).astype(q.dtype).reshape(q.shape)
            editor.set_constant_input(self.dq, 0, new, base)
            return
        shape = self.shape or (stored.size,)
        editor.set_constant_input(self.owner, self.index, stored.astype(self.dtype).reshape(shape), base)


@dataclass(eq=False)
class Codebook:
    """Shared values of a codebook layer: ``values`` [R, Kc] (R = 1 or M) stored centroids, ``codes`` [M, K];
    ``gather``: the node reading the codebook constant (packed form), None for the dense form."""

    values: np.ndarray | None = None
    codes: np.ndarray | None = None
    gather: gs.Node | None = None
    scales: np.ndarray | None = None  # [M] channel scales: row m is scales[m] * values[0][codes[m]]


@dataclass(eq=False)
class Int8Weight:
    """An int8 weight as the layer sees it: ``holder`` (DequantizeLinear or Cast) reads the stored values ``q``
    at input 0; ``row_scale`` [M] is each effective row's scale (Gemm's alpha folded in), ``qmax`` the grid's
    bound (127, or 63 for reduce_range); ``zeros_fixed``: the zeros are pruned weights, not small ones."""

    holder: gs.Node
    q: np.ndarray
    row_scale: np.ndarray
    qmax: int
    zeros_fixed: bool

    def write(self, editor: GraphEditor, node: gs.Node, rows: np.ndarray, base: str) -> None:
        """Store the effective rows ``rows`` [M, K] (on the grid: ``row_scale`` times integers)."""
        q = np.clip(np.rint(rows / self.row_scale[:, None]), -self.qmax, self.qmax)
        new = from_rows(node, q, self.q.shape, alpha=False).astype(self.q.dtype)
        editor.set_constant_input(self.holder, 0, new, f"{base}_weight_quantized")


@dataclass(eq=False)
class Layer:
    node: gs.Node
    kind: str  # float | codebook | int8
    output: gs.Tensor  # the layer's output (the bias Add's for a MatMul)
    x: str  # its input activation
    bias: BiasSlot | None
    weight: np.ndarray | None = None  # stored weight (packed codebooks: filled from a student run)
    book: Codebook | None = None  # its values and codes: refit through them (float weights too, where few)
    weights_ok: bool = False  # weights (or centroids) may be refit; else bias only
    patches: ConvPatches | None = None
    wave: int = 0
    int8: Int8Weight | None = None  # int8 layers whose values may move on their grid

    @property
    def name(self) -> str:
        return self.node.name or self.output.name


def find_layers(graph: gs.Graph, op_types: list[str], exclude: list[str], result: PassResult) -> list[Layer]:
    """Every layer of ``op_types`` in the main graph whose weight is float, a codebook or int8, in graph order;
    the others are recorded as skips with the reason."""
    found = []
    for node in graph.nodes:
        if node.op not in op_types or node.domain not in (None, "", "ai.onnx") or len(node.inputs) < 2:
            continue
        if any(node_matches(p, node) for p in exclude):
            result.skip(node, "excluded by exclude_nodes", graph)
            continue
        why = _layer(graph, node)
        if isinstance(why, str):
            result.skip(node, why, graph)
        else:
            found.append(why)
    return found


def _layer(graph: gs.Graph, node: gs.Node) -> Layer | str:
    x, wt = node.inputs[0], node.inputs[1]
    if not isinstance(x, gs.Variable) or not x.name:
        return "input is not an activation"
    if node.op == "Conv" and node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET", "VALID", b"VALID"):
        return "Conv with auto_pad SAME_*: its patches are not modelled"
    kind, weight, book = _weight_kind(node, wt)
    if kind is None:
        return "weight is no float constant, codebook or int8 weight"
    if weight is not None and (weight.ndim < 3 if node.op == "Conv" else weight.ndim != 2):
        return f"weight of rank {weight.ndim} is not a {node.op} weight"
    if _read_elsewhere(wt):
        return "weight is read by several layers (a refit for one would change the others)"
    out = node.outputs[0]
    slot = _bias_slot(graph, node, kind)
    if isinstance(slot, str):
        return slot
    if slot is not None and slot.owner is not node:
        out = slot.owner.outputs[0]
    if slot is not None and slot.create:
        dtype = weight.dtype if weight is not None else constant_source(book.gather.inputs[0]).constant.dtype
        slot.dtype = np.dtype(dtype)
    layer = Layer(node, kind, out, x.name, slot, weight, book)
    if kind == "int8":
        layer.int8 = _int8_weight(node, wt)
        if layer.int8 is not None:  # the dequantized weight: rows, patches and moments as for a float one
            layer.weight = from_rows(
                node, to_rows(node, layer.int8.q, alpha=False) * layer.int8.row_scale[:, None], layer.int8.q.shape
            )
    return layer


def _read_elsewhere(wt: gs.Tensor) -> bool:
    if constant_source(wt) is not None:
        return is_shared(wt)
    return len(wt.outputs) > 1


def _weight_kind(node: gs.Node, wt: gs.Tensor) -> tuple[str | None, np.ndarray | None, Codebook | None]:
    src = constant_source(wt)
    if src is not None:
        w = np.asarray(peek_values(src.constant))
        if w.dtype not in _FLOATS:
            return None, None, None
        rows = to_rows(node, w, alpha=False) if w.ndim >= 2 else None
        dense = dense_codebook(rows) if rows is not None else None
        if dense is None:
            return "float", w, None
        return ("codebook" if _repeats(rows, dense[0]) else "float"), w, Codebook(*dense)
    t, node = wt, producer(wt)
    for _ in range(2):  # the packed chain ends in Reshape, then maybe a Transpose
        if node is not None and node.op in ("Transpose", "Reshape"):
            t = node.inputs[0]
            node = producer(t)
    scales = None
    if node is not None and node.op == "Mul" and len(node.inputs) == 2 and constant_source(node.inputs[1]):
        scales = np.asarray(peek_values(constant_source(node.inputs[1]).constant)).reshape(-1)
        node = producer(node.inputs[0])  # channel scales times Reshape(Gather(codebook, codes))
        node = producer(node.inputs[0]) if node is not None and node.op == "Reshape" else None
    if node is not None and node.op in ("Gather", "GatherElements") and len(node.inputs) == 2:
        cb = constant_source(node.inputs[0])
        if (
            cb is not None
            and np.dtype(cb.constant.dtype) in _FLOATS
            and len(cb.constant.shape) == (1 if node.op == "Gather" else 2)
            and (scales is None or node.op == "Gather")
        ):
            return "codebook", None, Codebook(gather=node, scales=scales)
    node = producer(wt)
    if node is not None and node.op == "DequantizeLinear" and _int_constant(node.inputs[0]):
        return "int8", None, None
    if node is not None and node.op == "Mul" and len(node.inputs) == 2:
        for a, b in (node.inputs, node.inputs[::-1]):
            cast = producer(a)
            if cast is not None and cast.op == "Cast" and _int_constant(cast.inputs[0]) and constant_source(b):
                return "int8", None, None
    return None, None, None


def _int8_weight(node: gs.Node, wt: gs.Tensor) -> Int8Weight | None:
    """The int8 weight behind ``wt`` when its values can move on their grid: symmetric (zero point 0), one scale
    per output row or per tensor, the values read by this layer alone; None otherwise (bias only)."""
    holder = producer(wt)
    if holder.op == "DequantizeLinear":
        q, s, zp = _dq_parts(holder)
        if np.any(zp != 0):
            return None
        shape = [1] * q.ndim
        if s.size > 1:
            shape[int(holder.attrs.get("axis", 1)) % q.ndim] = -1
        scale = np.broadcast_to(s.reshape(shape), q.shape)
    else:  # Mul(Cast(q), scale), either order (as _weight_kind found it)
        pairs = [(producer(a), b) for a, b in (holder.inputs, holder.inputs[::-1])]
        holder, other = next((c, b) for c, b in pairs if c is not None and c.op == "Cast")
        q = np.asarray(peek_values(constant_source(holder.inputs[0]).constant))
        s = np.asarray(peek_values(constant_source(other).constant), np.float64)
        try:
            scale = np.broadcast_to(s, q.shape)
        except ValueError:
            return None
    if q.ndim < 2 or q.dtype != np.int8 or is_shared(holder.inputs[0]):
        return None
    rows = to_rows(node, scale)
    if not np.all(rows == rows[:, :1]) or not np.all(rows[:, 0] > 0):
        return None
    qmax = int(np.abs(q.astype(np.int32)).max(initial=0))
    if qmax == 0:
        return None
    return Int8Weight(holder, q, rows[:, 0].copy(), qmax, float(np.mean(q == 0)) > 0.25)


def _int_constant(t: gs.Tensor) -> bool:
    src = constant_source(t)
    return src is not None and np.dtype(src.constant.dtype).kind in "iu"


def _dq_parts(dq: gs.Node) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    q = np.asarray(peek_values(constant_source(dq.inputs[0]).constant))
    s = np.asarray(peek_values(constant_source(dq.inputs[1]).constant), np.float64).reshape(-1)
    zp = np.zeros(1)
    if len(dq.inputs) > 2 and dq.inputs[2].name:
        zp = np.asarray(peek_values(constant_source(dq.inputs[2]).constant), np.float64).reshape(-1)
    return q, s, zp


def _per_output(shape) -> bool:
    return len(shape) >= 1 and all(int(d) == 1 for d in shape[:-1])


def _slot_at(owner: gs.Node, index: int, scale: float) -> BiasSlot | str:
    """The bias at ``owner.inputs[index]``: a float constant or DequantizeLinear(int32 constant)."""
    t = owner.inputs[index]
    src = constant_source(t)
    if src is not None and np.dtype(src.constant.dtype) in _FLOATS:
        shape = tuple(int(d) for d in src.constant.shape)
        if not _per_output(shape):
            return f"bias of shape {list(shape)} is not one value per output"
        return BiasSlot(owner, index, scale, shape, np.dtype(src.constant.dtype))
    dq = producer(t)
    if (
        dq is not None
        and dq.op == "DequantizeLinear"
        and len(t.outputs) == 1
        and _int_constant(dq.inputs[0])
        and all(constant_source(i) is not None for i in dq.inputs[1:] if i.name)
    ):
        shape = tuple(int(d) for d in constant_source(dq.inputs[0]).constant.shape)
        if len(shape) == 1:
            return BiasSlot(owner, index, scale, shape, dq=dq)
    return "bias is no constant (nor an int32 DequantizeLinear)"


def _bias_slot(graph: gs.Graph, node: gs.Node, kind: str) -> BiasSlot | str | None:
    """The layer's bias slot; None: it has none and none is made (MatMul without an Add, int8 without one)."""
    if node.op == "Conv":
        if len(node.inputs) > 2 and node.inputs[2].name:
            return _slot_at(node, 2, 1.0)
        return None if kind == "int8" else BiasSlot(node, 2, create=True)
    if node.op == "Gemm":
        beta = float(node.attrs.get("beta", 1.0))
        if len(node.inputs) > 2 and node.inputs[2].name:
            return "Gemm with beta=0 and a bias" if beta == 0 else _slot_at(node, 2, beta)
        return None if kind == "int8" or beta == 0 else BiasSlot(node, 2, beta, create=True)
    out = node.outputs[0]  # MatMul: the per-output constant of the Add that alone reads its output
    if len(out.outputs) != 1 or out in graph.outputs or out.outputs[0].op != "Add":
        return None
    add = out.outputs[0]
    other = 1 if add.inputs[0] is out else 0
    slot = _slot_at(add, other, 1.0) if len(add.inputs) == 2 and add.inputs[1 - other] is out else "no bias"
    return slot if isinstance(slot, BiasSlot) else None


# ------------------------------------------------------------------------------------------ weight views
def to_rows(node: gs.Node, w: np.ndarray, alpha: bool = True) -> np.ndarray:
    """The stored weight as the effective ``[M, K]`` (float64; ``alpha=False``: without Gemm's alpha)."""
    w = np.asarray(w, np.float64)
    if node.op == "Conv":
        return w.reshape(w.shape[0], -1)
    if node.op == "Gemm":
        rows = w if int(node.attrs.get("transB", 0)) else w.T
        return rows * float(node.attrs.get("alpha", 1.0)) if alpha else rows
    return w.T


def from_rows(node: gs.Node, rows: np.ndarray, shape: tuple, alpha: bool = True) -> np.ndarray:
    """Inverse of ``to_rows``."""
    if node.op == "Conv":
        return rows.reshape(shape)
    if node.op == "Gemm":
        rows = rows / float(node.attrs.get("alpha", 1.0)) if alpha else rows
        return rows if int(node.attrs.get("transB", 0)) else rows.T
    return rows.T


def dense_codebook(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(values [R, Kc], codes [M, K]) when ``rows`` holds at most 256 distinct values (one codebook, else one per
    row); None otherwise."""
    values = np.unique(rows)
    if len(values) <= _MAX_CENTROIDS:
        return values[None, :], np.searchsorted(values, rows)
    per_row = [np.unique(r) for r in rows]
    kc = max(len(u) for u in per_row)
    if kc > _MAX_CENTROIDS:
        return None
    book = np.stack([np.pad(u, (0, kc - len(u)), mode="edge") for u in per_row])
    return book, np.stack([np.searchsorted(u, r) for u, r in zip(per_row, rows)])


def _repeats(rows: np.ndarray, book: np.ndarray) -> bool:
    """True when the non-zero values repeat (shared), not merely few because the weight is small."""
    nnz = int(np.count_nonzero(rows))
    if book.shape[0] == 1:
        distinct = int(np.count_nonzero(book))
    else:
        distinct = sum(len(np.unique(r[r != 0])) for r in rows)
    return nnz > 0 and distinct <= 0.75 * nnz


def codes_for(rows: np.ndarray, book: np.ndarray) -> np.ndarray | None:
    """The codes that rebuild ``rows`` [M, K] from ``book`` [R, Kc] exactly (None when some value is missing)."""
    codes = np.empty(rows.shape, dtype=np.int64)
    for m in range(rows.shape[0]):
        cb = book[0 if book.shape[0] == 1 else m]
        order = np.argsort(cb, kind="stable")
        pos = np.clip(np.searchsorted(cb[order], rows[m]), 0, len(cb) - 1)
        codes[m] = order[pos]
        if not np.array_equal(cb[codes[m]], rows[m]):
            return None
    return codes


def conv_geometry(layer: Layer) -> ConvPatches | None:
    """Patches of a group-1 Conv (its Gram is over them); None for grouped Convs and unknown padding."""
    if layer.node.op != "Conv" or layer.weight is None:
        return None
    return conv_patches(layer.node, list(layer.weight.shape))
