"""share_weights: cluster each layer's weights into 2^b shared values and store b-bit indices plus the codebook
(lossy; Deep Compression's weight sharing, refined from calibration data).

Which weights: the float constant weights of Conv/ConvTranspose/Gemm/MatMul, Gather (embedding) tables and the
input and recurrence weights (W, R) of LSTM/GRU/RNN (rows: direction x gate units), in initializers, ``Constant``
nodes and If/Loop bodies; not layers under ``min_weights`` elements, ``exclude_nodes``
and, with ``keep_first_last``, the layers nearest the inputs and outputs. ``layer_bits`` overrides b per layer.

How (``_codebook``): each weight, as ``[rows, cols]`` (output x input features), gets one codebook (or one per
output row with ``per_channel``) from weighted 1-D k-means (Lloyd, linearly spaced start). With
``channel_scales`` the one codebook is shared by rows rescaled to a common range, ``w_r = s_r * C[codes_r]``:
BatchNorm-folded channels of very different scales then use all 2^b values each, at 4 bytes a row instead of
the 4 * 2^b of a codebook per row; codes, codebook and scales are refit in turn. With calibration
data each weight's squared error is weighted by its input's energy ``E[x_j^2]`` (the Gram diagonal; per-channel
norms where no Gram applies), then, where the layer's input Gram ``H`` is known, the codes are re-chosen
column by column with each column's error pushed onto the later columns (GPTQ's machinery with centroids for
levels), and the centroids refitted by least squares so the layer's outputs on the calibration data move least.
The result with the lower output error (refined or plain k-means) is kept. A weight with at least
``zero_fraction`` exact zeros (pruned) keeps an exact 0 centroid, and its zeros stay zero. Grouped and
depthwise Convs get ``grouped_bits`` (8): no input Gram reaches them, and their few weights a channel cost
few bytes.

Storage (``_encode``): the codes packed at b bits (``onnxslim.bit_packing``) plus the codebook, rebuilt by
standard ops (opset >= 11) that onnxruntime folds once at session load, so inference runs at fp32 speed: about
b/32 of the fp32 bytes plus the codebook. ``decode=dense`` writes the shared values as dense floats instead
(they then compress well: the report gives zlib-compressed bytes). Weights read from several graphs, or a graph
output, stay dense.

Bits per layer (``allocation=sensitivity``, or ``min_score``, with calibration data): b is then the average; the
largest layers are shared alone at a few widths and measured, and the bits go where they matter
(``_allocate_bits``). Off by default: on the real-model set it helped one model of four on held-out data and hurt
one (bench/RESULTS.md), the calibration set being small.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.bit_packing import pack_codes
from onnxslim.calibration_service import StatisticsRequest
from onnxslim.graph_edit import ConstantSource, node_matches, peek_values, producer, replace_input
from onnxslim.pass_base import Pass, PassContext, PassResult, iter_graphs
from onnxslim.sensitivity import check_criterion, resolve_criterion
from onnxslim.weight_layout import (
    RNN_WEIGHT_INPUTS,
    WEIGHT_INPUT,
    WeightLayout,
    edge_layers,
    float_weights,
    weight_layout,
)

from ._allocate_bits import allocate_bits
from ._codebook import (
    compensated_codes,
    decode,
    kmeans,
    output_error,
    refit_codebook,
    refit_scales,
    row_scales,
    sort_codebook,
    zero_index,
)
from ._encode import insert_decoder, stored_nbytes

__all__ = ["ShareWeights"]

log = logging.getLogger(__name__)

# The weights shared: each layer op's weight input, and a recurrent layer's W and R (rows: direction x gates).
SHARED_INPUTS: dict[str, tuple[int, ...]] = {**{op: (i,) for op, i in WEIGHT_INPUT.items()}, **RNN_WEIGHT_INPUTS}


_SCALE_ROUNDS = 3  # channel scales: rounds of (codes, codebook, scales) refits at most, while the error falls


class _Shared(NamedTuple):
    codes: np.ndarray  # [rows, cols]
    codebook: np.ndarray  # [R, K] float64
    scales: np.ndarray | None  # [rows] float64 (channel_scales): row r is scales[r] * codebook[0][codes[r]]
    order: tuple[int, ...]  # the weight's axes, output axes first: the [rows, cols] view
    facts: dict


@dataclass
class _Layer:
    graph: gs.Graph
    node: gs.Node
    source: ConstantSource
    layout: WeightLayout | None
    readers: int
    bits: int
    gram: bool = False
    pinned: bool = False  # its bits come from layer_bits: the allocation leaves it as given


class ShareWeights(Pass):
    """Cluster weights into 2^b shared values (k-means, refined from data); store b-bit codes + codebook."""

    name = "share_weights"
    exact = False
    runs_before = ("quantize_int8_static", "distill_layers", "pack_sparse_weights")
    needs_calibration = False  # used when given: importance weights, compensated codes, centroid refit
    metric_floors = {"cosine": 0.98, "sample_cosine": 0.9, "top1_agreement": 0.98, "accuracy_drop": 0.01}

    @dataclass
    class Options:
        bits: int = field(default=4, metadata={"help": "index bits b: 2^b shared values per codebook (2..8)"})
        per_channel: bool = field(default=False, metadata={"help": "one codebook per output channel"})
        channel_scales: bool = field(
            default=True,
            metadata={
                "help": "one codebook per tensor times one scale per output channel (w = s_c * C[code]): "
                "channels of very different ranges at 4 bytes a channel (per_channel=true replaces it)"
            },
        )
        assignment: Literal["auto", "compensated", "nearest"] = field(
            default="auto",
            metadata={
                "help": "compensated: codes chosen column by column, errors pushed on (GPTQ form), from the input "
                "Gram; nearest: nearest centroid; auto = compensated with calibration data"
            },
        )
        refit: bool = field(default=True, metadata={"help": "with data: refit centroids by least squares on H"})
        decode: Literal["packed", "dense"] = field(
            default="packed", metadata={"help": "packed: b-bit codes + codebook; dense: shared float weights"}
        )
        zero_fraction: float = field(
            default=0.1, metadata={"help": "keep an exact 0 centroid when this fraction of weights is 0 (pruned)"}
        )
        op_types: list[str] = field(default_factory=lambda: list(SHARED_INPUTS), metadata={"help": "ops shared"})
        grouped_bits: int = field(
            default=8,
            metadata={
                "help": "bits for grouped and depthwise Convs (0 = b): no input Gram reaches them to compensate the "
                "codes, and they hold few bytes (DBNet: 0.926 -> 0.980 agreement for 0.163x -> 0.169x)"
            },
        )
        layer_bits: list[str] = field(
            default_factory=list, metadata={"help": "per-layer bits PATTERN=B (names, globs, re:REGEX, op:OpType)"}
        )
        exclude_nodes: list[str] = field(default_factory=list, metadata={"help": "layers kept as they are"})
        keep_first_last: bool = field(default=True, metadata={"help": "keep the first and last layers as they are"})
        min_weights: int = field(default=2048, metadata={"help": "layers with fewer weight elements are kept"})
        iterations: int = field(default=50, metadata={"help": "Lloyd iterations at most"})
        damping: float = field(default=0.01, metadata={"help": "compensated codes: added to diag(H), rel. to mean"})
        max_gram_mb: int = field(default=1024, metadata={"help": "memory for input Gram matrices (8 C^2 bytes)"})
        allocation: Literal["uniform", "sensitivity"] = field(
            default="uniform",
            metadata={
                "help": "uniform: every layer at b bits; sensitivity (needs calibration data): each of the largest "
                "layers shared alone at a few widths and measured, then b bits on average spread by least damage "
                "per bit saved (same index bytes; kept only when it measures better on the calibration data)"
            },
        )
        sensitivity_metric: str = field(
            default="decisions",
            metadata={"help": "allocation=sensitivity: cosine, decisions, or script.py:function(reference, candidate)"},
        )
        sensitivity_samples: int = field(
            default=8, metadata={"help": "allocation=sensitivity: calibration samples the outputs are compared on"}
        )
        sensitivity_layers: int = field(
            default=16, metadata={"help": "allocation=sensitivity: probe the largest this many layers (0 = all)"}
        )
        min_score: float = field(
            default=0.0,
            metadata={
                "help": "an accuracy floor instead of a size (implies allocation=sensitivity): the fewest bits (down "
                "to b) whose measured score (sensitivity_metric, 1 = unchanged) stays >= this, e.g. 0.99"
            },
        )

        def validate(self) -> str | None:
            if not 2 <= self.bits <= 8:
                return f"bits must be in 2..8; got {self.bits} (e.g. --share 4)"
            if self.grouped_bits and not 2 <= self.grouped_bits <= 8:
                return f"grouped_bits must be 0 (= bits) or in 2..8; got {self.grouped_bits}"
            try:
                _parse_bits(self.layer_bits)
            except ValueError as e:
                return str(e)
            unknown = sorted(set(self.op_types) - set(SHARED_INPUTS))
            if unknown:
                return f"op_types {', '.join(unknown)} cannot be shared; choose from {', '.join(SHARED_INPUTS)}"
            if not 0.0 < self.zero_fraction <= 1.0:
                return f"zero_fraction must be in (0, 1]; got {self.zero_fraction}"
            if self.min_weights < 0 or self.iterations < 1 or not self.damping > 0 or self.max_gram_mb < 0:
                return "min_weights and max_gram_mb must be >= 0, iterations >= 1 and damping > 0"
            if self.sensitivity_samples < 1 or self.sensitivity_layers < 0:
                return "sensitivity_samples must be >= 1 and sensitivity_layers >= 0"
            if not 0.0 <= self.min_score < 1.0:
                return f"min_score must be in [0, 1) (e.g. 0.99); got {self.min_score}"
            return check_criterion(self.sensitivity_metric, "sensitivity_metric")

    # ------------------------------------------------------------------------------------------ run
    def run(self, ctx: PassContext) -> PassResult:
        opts = self.options
        result = PassResult()
        layers = self._layers(ctx, result)
        if not layers:
            result.notes.append("nothing to share: no layer passed the selection rules (see the skips)")
            return result
        stats = self._statistics(ctx, layers) if ctx.calibration is not None else {}
        packed = opts.decode == "packed" and ctx.opset >= 11
        if opts.decode == "packed" and not packed:
            result.notes.append(f"opset {ctx.opset} < 11 (BitShift): shared weights written dense")
        if opts.allocation == "sensitivity" or opts.min_score:
            self._allocate(ctx, layers, stats, result)
        graph_of = {id(n): g for g in iter_graphs(ctx.graph) for n in g.nodes}
        editors: dict[int, object] = {}
        rng = np.random.default_rng(ctx.seed)
        for layer in layers:
            w = np.asarray(peek_values(layer.source.constant))
            done = self._share(layer, w, stats, rng)
            if isinstance(done, str):
                result.skip(layer.node, done, layer.graph)
                continue
            codes, order, facts = done.codes, done.order, done.facts
            scales = None if done.scales is None else done.scales.astype(w.dtype)
            shared = _dense(done, w.dtype, w.shape)
            dense_bytes = int(w.nbytes)
            where = self._placement(layer, graph_of) if packed else None
            if where is None:
                layer.source.constant.values = shared
                stored = dense_bytes
                zipped = len(zlib.compress(shared.tobytes(), 6))
                if packed:
                    result.notes.append(f"{layer.node.name}: weight read from several graphs; written dense")
            else:
                graph, readers, tensor = where
                editor = editors.setdefault(id(graph), ctx.edit(graph))
                cb = done.codebook.astype(w.dtype)
                nnz = int(np.count_nonzero(codes))
                stored = stored_nbytes(codes.size, layer.bits, cb, scales=scales)
                sparse = bool(facts["kept_zero"] and np.all(cb[:, 0] == 0) and 0 < nnz < codes.size)
                stored_sparse = stored_nbytes(codes.size, layer.bits, cb, nnz, scales) if sparse else stored
                if stored_sparse < stored:
                    stored = stored_sparse
                    facts = facts | {"sparse_codes": True}
                else:
                    sparse = False
                self._encode(editor, layer, tensor, readers, codes, cb, scales, order, w.shape, sparse)
                zipped = len(zlib.compress(_payload(codes, layer.bits, cb, scales, sparse), 6))
            result.layers.append(
                facts | {"dense_bytes": dense_bytes, "stored_bytes": int(stored), "zip_bytes": int(zipped)}
            )
            result.count("weights_shared", int(w.size))
            result.count("layers_shared")
            result.count("bytes_saved", dense_bytes - int(stored))
            result.modified = True
        for editor in editors.values():
            editor.commit()
        if result.layers:
            dense = sum(d["dense_bytes"] for d in result.layers)
            stored = sum(d["stored_bytes"] for d in result.layers)
            result.notes.append(f"shared weights: {dense:,} dense bytes -> {stored:,} stored ({stored / dense:.3f})")
        return result

    # ------------------------------------------------------------------------------------------ selection
    def _layers(self, ctx: PassContext, result: PassResult) -> list[_Layer]:
        opts = self.options
        overrides = _parse_bits(opts.layer_bits)
        # Gather: an embedding table (axis 0), not a lookup onnxruntime folds (a codebook, a packed mask)
        embedding = lambda n: (
            n.op != "Gather" or (int(n.attrs.get("axis", 0)) == 0 and not _from_constants(n.inputs[1]))
        )
        sites = float_weights(ctx.graph, embedding, SHARED_INPUTS)
        edge = edge_layers(ctx.graph, {id(x.node) for x in sites}) if opts.keep_first_last else set()
        found: dict[int, _Layer] = {}
        for site in sites:
            g, node, i, src = site.graph, site.node, site.index, site.source
            key = id(src.constant)
            if node.op not in opts.op_types or key in found:
                continue
            shape = [int(d) for d in src.constant.shape]
            size = int(np.prod(shape)) if shape else 1
            bits = opts.bits
            if node.op == "Conv" and int(node.attrs.get("group", 1)) > 1 and opts.grouped_bits:
                bits = max(bits, opts.grouped_bits)
            for pattern, b in overrides:
                if node_matches(pattern, node):
                    bits = b
            why = None
            if any(node_matches(p, node) for p in opts.exclude_nodes):
                why = "excluded by exclude_nodes"
            elif id(node) in edge:
                why = "first or last layer (keep_first_last)"
            elif size < opts.min_weights:
                why = f"{size} weights < min_weights={opts.min_weights}"
            elif bits == 0:
                why = "layer_bits says 0"
            elif node.op == "Gather" and len(shape) < 2:
                why = "a 1-D Gather table is no embedding"
            elif node.op in RNN_WEIGHT_INPUTS and weight_layout(node, i, shape) is None:
                why = "a GRU recurrence weight with linear_before_reset=0 (it reads r * h, which is not exposed)"
            if why:
                result.skip(node, why, g)
                continue
            layout = weight_layout(node, i, shape) if node.op != "Gather" else None
            found[key] = _Layer(g, node, src, layout, site.readers, bits, pinned=bits != opts.bits)
        return list(found.values())

    def _statistics(self, ctx: PassContext, layers: list[_Layer]):
        """One request: every layer's input Gram where it applies (within ``max_gram_mb``), else input norms."""
        grams: dict[str, object] = {}
        norms: dict[str, int] = {}
        budget = self.options.max_gram_mb * 2**20
        for layer in layers:
            lo = layer.layout
            if lo is None:
                continue
            cols = int(np.prod([layer.source.constant.shape[a] for a in lo.in_axes]))
            if lo.gram is not None and layer.readers == 1:
                if lo.activation not in grams and 8 * cols**2 <= budget:
                    budget -= 8 * cols**2
                    grams[lo.activation] = lo.gram
                if grams.get(lo.activation) == lo.gram:
                    layer.gram = True
                    continue
            if norms.get(lo.activation, lo.channel_axis) == lo.channel_axis and lo.activation not in grams:
                norms[lo.activation] = lo.channel_axis
        if not grams and not norms:
            return {}
        return ctx.statistics(StatisticsRequest(grams=grams, norms=norms))

    def _allocate(self, ctx: PassContext, layers: list[_Layer], stats, result: PassResult) -> None:
        """Per-layer bits from measured sensitivity (``_allocate_bits``), b bits on average."""
        opts = self.options
        if ctx.calibration is None:
            result.notes.append("allocation=sensitivity needs calibration data: every layer at b bits")
            return
        free = [x for x in layers if not x.pinned]  # layer_bits overrides are the user's word
        if not free:
            return

        def shared_at(layer: _Layer, bits: int) -> np.ndarray:
            w = np.asarray(peek_values(layer.source.constant))
            layer.bits, target = bits, layer.bits
            try:
                done = self._share(layer, w, stats, np.random.default_rng(ctx.seed))
            finally:
                layer.bits = target
            if isinstance(done, str):  # already holds few values: as it is
                return w
            return _dense(done, w.dtype, w.shape)

        metric = resolve_criterion(opts.sensitivity_metric)
        chosen = allocate_bits(
            ctx,
            free,
            opts.bits,
            shared_at,
            metric,
            opts.sensitivity_samples,
            result.notes,
            opts.sensitivity_layers,
            min_score=opts.min_score,
        )
        for layer in free:
            layer.bits = chosen.get(id(layer), layer.bits)

    # ------------------------------------------------------------------------------------------ one layer
    def _share(self, layer: _Layer, w: np.ndarray, stats, rng) -> _Shared | str:
        """The layer's codes, codebook and scales, or why the layer is left alone."""
        opts, node, lo = self.options, layer.node, layer.layout
        k = 1 << layer.bits
        if lo is None:  # an embedding table [V, D...]: rows are the embedding features
            order = tuple(range(1, w.ndim)) + (0,)
        else:
            order = tuple(lo.out_axes) + tuple(lo.in_axes)
        moved = np.transpose(w, order)
        rows = int(np.prod(moved.shape[: w.ndim - 1])) if lo is None else int(np.prod(moved.shape[: len(lo.out_axes)]))
        w2 = moved.reshape(rows, -1).astype(np.float64)
        scaled = opts.channel_scales and not opts.per_channel and rows > 1
        scales = row_scales(w2) if scaled else None
        unit = w2 / scales[:, None] if scaled else w2
        flat = w2 if opts.per_channel else w2.reshape(1, -1)
        if max(len(np.unique(r)) for r in flat) <= k:
            return f"already holds at most {k} values per codebook (shared)"
        st = stats.get(lo.activation) if lo is not None and hasattr(stats, "get") else None
        h = None
        if layer.gram and st is not None and st.gram is not None and st.gram_rows:
            h = st.gram / st.gram_rows
            if h.shape != (w2.shape[1],) * 2:
                h = None
        importance = _importance(node, lo, w, st, h, w2.shape)
        keep_zero = float(np.mean(w2 == 0)) >= opts.zero_fraction
        imp = None if importance is None else np.broadcast_to(importance, w2.shape)
        if scaled:  # an error of e in the unit row is s_r * e in the weight
            imp = (np.ones(w2.shape) if imp is None else imp) * (scales**2)[:, None]
        fit = unit if opts.per_channel and not scaled else unit.reshape(1, -1)
        cb, codes = kmeans(fit, k, None if imp is None else imp.reshape(fit.shape), keep_zero, opts.iterations, rng)
        codes = codes.reshape(w2.shape)
        if scaled:
            scales = refit_scales(w2, decode(cb, codes), scales, weights=importance)
        facts = {"layer": node.name, "op": node.op, "params": int(w.size), "bits": layer.bits}
        method = "kmeans" + ("_weighted" if importance is not None else "") + ("+scales" if scaled else "")
        if h is not None:
            plain = output_error(w2, _rows(cb, codes, scales), h)
            assignment = opts.assignment if opts.assignment != "auto" else "compensated"
            best = (plain, cb, codes, scales)
            for _ in range(_SCALE_ROUNDS if scaled and (opts.refit or assignment == "compensated") else 1):
                new_cb, new_codes, new_s = best[1], best[2], best[3]
                if assignment == "compensated":
                    per_row = cb if not scaled else new_s[:, None] * new_cb
                    new_codes = compensated_codes(w2, h, per_row, (w2 == 0) if keep_zero else None, opts.damping)
                if opts.refit:
                    new_cb = refit_codebook(w2, h, new_codes, new_cb, keep_zero, new_s)
                    if scaled:
                        new_cb, new_codes = sort_codebook(new_cb, new_codes)
                        new_s = refit_scales(w2, decode(new_cb, new_codes), new_s, hessian=h)
                err = output_error(w2, _rows(new_cb, new_codes, new_s), h)
                if err >= best[0]:
                    break
                best = (err, new_cb, new_codes, new_s)
            facts["kmeans_output_error"] = round(plain, 6)
            if best[0] < plain:
                _, cb, codes, scales = best
                method = "+".join(
                    ["kmeans+scales" if scaled else "kmeans"]
                    + (["compensated"] if assignment == "compensated" else [])
                    + (["refit"] if opts.refit else [])
                )
            facts["output_error"] = round(best[0], 6)
        if keep_zero:
            cb, codes = _zero_first(cb, codes)
        return _Shared(codes, cb, scales, order, facts | {"method": method, "kept_zero": keep_zero})

    # ------------------------------------------------------------------------------------------ storage
    def _placement(self, layer: _Layer, graph_of: dict[int, gs.Graph]):
        """(graph, readers, tensor) for the decoding chain: the tensor the constant is read as, when every reader
        lives in one graph and it is no graph output; else None (the weight is written dense)."""
        src = layer.source
        tensor = src.constant if src.node is None else src.node.outputs[0]
        readers = list(tensor.outputs)
        homes = [graph_of.get(id(r)) for r in readers]
        if not readers or any(g is None for g in homes) or len({id(g) for g in homes}) != 1:
            return None
        graph = graph_of[id(readers[0])]
        if any(tensor is t for g in iter_graphs(graph) for t in g.outputs):
            return None
        if src.node is not None and graph_of.get(id(src.node)) is not graph:
            return None
        return graph, readers, tensor

    def _encode(self, editor, layer, tensor, readers, codes, codebook, scales, order, shape, sparse: bool) -> None:
        position = {id(n): i for i, n in enumerate(editor.graph.nodes)}
        src = layer.source
        first = src.node if src.node is not None else min(readers, key=lambda r: position[id(r)])
        out = insert_decoder(
            editor, tensor.name or "w", codes, codebook, layer.bits, order, tuple(shape), first, sparse, scales
        )
        for r in readers:
            replace_input(r, tensor, out)
        name = tensor.name
        tensor.name = editor.fresh_name(name + "_dense")  # the old constant, now unread
        out.name = name
        if src.node is not None:
            editor.remove_node(src.node)


# --------------------------------------------------------------------------------------------- helpers
def _parse_bits(entries: list[str]) -> list[tuple[str, int]]:
    out = []
    for text in entries:
        pattern, sep, value = text.rpartition("=")
        if not sep or not pattern or not value.isdigit() or not (int(value) == 0 or 2 <= int(value) <= 8):
            raise ValueError(f"layer_bits entries are PATTERN=B with B in 2..8 (0 keeps the layer); got {text!r}")
        out.append((pattern, int(value)))
    return out


def _rows(codebook: np.ndarray, codes: np.ndarray, scales: np.ndarray | None) -> np.ndarray:
    """The decoded ``[rows, cols]`` view (in the codebook's dtype: float32 as the decoding chain computes it)."""
    view = decode(codebook, codes)
    return view if scales is None else view * scales.astype(codebook.dtype)[:, None]


def _dense(shared: _Shared, dtype, shape) -> np.ndarray:
    """The shared weight exactly as the decoding chain rebuilds it."""
    scales = None if shared.scales is None else shared.scales.astype(dtype)
    view = _rows(shared.codebook.astype(dtype), shared.codes, scales)
    return view.reshape([int(shape[a]) for a in shared.order]).transpose(np.argsort(shared.order))


def _payload(codes: np.ndarray, bits: int, codebook: np.ndarray, scales, sparse: bool = False) -> bytes:
    flat = codes.reshape(-1)
    kept = flat[flat != 0] if sparse else flat
    packed = kept.astype(np.uint8) if bits == 8 else pack_codes(kept, bits)
    mask = pack_codes(flat != 0, 1).tobytes() if sparse else b""
    return mask + packed.tobytes() + codebook.tobytes() + (b"" if scales is None else scales.tobytes())


def _zero_first(codebook: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Put each codebook row's zero centroid at index 0 (zeros become code 0: packs well after pruning)."""
    k = codebook.shape[1]
    swap = np.tile(np.arange(k), (codebook.shape[0], 1))
    z = zero_index(codebook)
    rows = np.arange(codebook.shape[0])
    swap[rows, 0], swap[rows, z] = z, 0  # a swap is its own inverse
    cb = np.take_along_axis(codebook, swap, axis=1)
    codes = swap[0][codes] if codebook.shape[0] == 1 else np.take_along_axis(swap, codes, axis=1)
    return cb, codes


def _importance(node, lo, w, st, h, shape2) -> np.ndarray | None:
    """``E[x_j^2]`` per column of the 2-D view (the Gram diagonal, or squared per-channel input norms)."""
    if h is not None:
        return np.maximum(np.diag(h), 0.0)[None, :]
    norm = getattr(st, "channel_norm", None) if st is not None else None
    if norm is None or lo is None:
        return None
    norm = np.asarray(norm, dtype=np.float64) ** 2
    cw = lo.weight_channel_axis
    channels = w.shape[cw]
    group = int(node.attrs.get("group", 1)) if node.op == "Conv" else 1
    if norm.size != channels * group:
        return None
    view = [1] * w.ndim
    if group == 1:
        view[cw] = channels
        full = np.broadcast_to(norm.reshape(view), w.shape)
    else:  # grouped Conv: output row o reads the input channels of its group
        out = w.shape[0]
        per_row = norm.reshape(group, channels)[np.arange(out) // (out // group)]
        full = np.broadcast_to(per_row.reshape(out, channels, *([1] * (w.ndim - 2))), w.shape)
    order = list(lo.out_axes) + list(lo.in_axes)
    return np.transpose(full, order).reshape(shape2)


def _from_constants(t: gs.Tensor, depth: int = 12) -> bool:
    """True when ``t`` is computed from constants only (within ``depth`` nodes): a lookup that gets folded."""
    if isinstance(t, gs.Constant):
        return True
    node = producer(t)
    if node is None or depth == 0 or node.op in ("If", "Loop", "Scan"):
        return False
    return all(_from_constants(x, depth - 1) for x in node.inputs if x is not None and x.name)
