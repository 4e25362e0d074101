"""prune_by_magnitude: zero the least important weights of Conv/ConvTranspose/Gemm/MatMul layers and embedding
tables, unstructured or N:M, with one-shot reconstruction from calibration data (lossy).

Which weights: every float constant weight of those ops (initializers, ``Constant`` nodes, outer-scope constants
read inside If/Loop bodies), except layers smaller than ``min_weights`` elements, the ``exclude_nodes``, and, with
``keep_first_last``, the layers nearest the model's inputs and outputs (no other layer before / after them in the
main graph: they see raw inputs or produce the answers, and hold few weights). ``layer_sparsity`` overrides the
target per layer (``PATTERN=S``; patterns as everywhere: names, globs, ``re:REGEX``, ``op:OpType``).

How (``_sparsify``): without calibration data, by magnitude (the layer's ``ceil(s n)`` smallest ``|w|``). With it,
SparseGPT by default (``reconstruct=sparsegpt``): each layer's input Gram matrix ``E[x x^T]`` (one streaming run of
the shared statistics service, the same matrices GPTQ uses) decides the mask by the optimal-brain-surgeon saliency
and moves the surviving weights of the layer to absorb the error, so the layer's outputs on the calibration data
change as little as possible, with no training. Layers whose Gram is not available (grouped/depthwise Conv,
ConvTranspose, inputs past ``max_gram_mb``, weights read by several layers) use Wanda, ``|w| * ||x||`` per output,
from per-channel input norms. ``importance=magnitude`` / ``wanda`` with ``reconstruct=none`` give the plain
criteria (the bench compares all three).

N:M (``pattern=2:4``): at most N non-zeros in every M consecutive input channels of each output (for a Conv, at
each kernel position: the layout sparse tensor cores and sparse CPU kernels read), i.e. 1 - N/M sparsity; layers
whose input channels are not a multiple of M are left dense and reported.

The zeros stay dense in the graph; ``pack_sparse_weights`` (run last by ``--prune``) stores them compactly.
Per-layer facts (sparsity reached, method, relative output error on the calibration inputs) are in the report.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.calibration_service import StatisticsRequest
from onnxslim.errors import UsageError
from onnxslim.graph_edit import ConstantSource, node_matches, peek_values
from onnxslim.pass_base import Pass, PassContext, PassResult
from onnxslim.sensitivity import check_criterion, resolve_criterion
from onnxslim.weight_layout import WEIGHT_INPUT, WeightLayout, edge_layers, float_weights, weight_layout

from ._allocate import allocate_sparsity
from ._layer_rules import parse_levels
from ._sparsify import magnitude_mask, nm_mask, output_error, row_mask, sparsegpt

__all__ = ["PruneByMagnitude", "parse_nm"]

log = logging.getLogger(__name__)


def parse_nm(text: str) -> tuple[int, int] | None:
    """``"2:4"`` -> (2, 4): at most N non-zeros in every M; None for ``unstructured``; ValueError when bad."""
    if text == "unstructured":
        return None
    try:
        n, m = (int(v) for v in text.split(":"))
    except ValueError:
        raise ValueError(f"pattern must be 'unstructured' or N:M such as 2:4; got {text!r}") from None
    if not 1 <= n < m:
        raise ValueError(f"pattern N:M needs 1 <= N < M (N non-zeros kept in every M); got {text!r}")
    return n, m


@dataclass
class _Layer:
    graph: gs.Graph
    node: gs.Node
    index: int
    source: ConstantSource
    layout: WeightLayout | None
    readers: int  # layers reading this weight (tied weights are pruned once, without reconstruction)
    sparsity: float = 0.0
    method: str = ""
    gram_request: object = None
    pinned: bool = False  # its sparsity comes from layer_sparsity: the allocation leaves it as given


class PruneByMagnitude(Pass):
    """Zero the least important weights (magnitude / Wanda / SparseGPT; unstructured or N:M)."""

    name = "prune_by_magnitude"
    exact = False
    runs_before = ("share_weights", "quantize_int8_static", "distill_layers", "pack_sparse_weights")
    needs_calibration = False  # used when given: Wanda norms and SparseGPT reconstruction
    idempotent = False
    # Judged by the decisions (top-1 agreement >= 0.98, the pruning issue's target) and the output cosine; one
    # sample's logits may move more than a quantizer's (cnn_digits at 50%: worst sample cosine 0.94, top-1 0.989).
    metric_floors = {"cosine": 0.98, "sample_cosine": 0.9, "top1_agreement": 0.98, "accuracy_drop": 0.01}

    @dataclass
    class Options:
        sparsity: float = field(default=0.5, metadata={"help": "fraction of each pruned layer's weights zeroed"})
        pattern: str = field(
            default="unstructured",
            metadata={"help": "unstructured, or N:M (e.g. 2:4): at most N non-zeros in every M input channels"},
        )
        importance: Literal["auto", "magnitude", "wanda"] = field(
            default="auto",
            metadata={"help": "where no reconstruction runs: |w| or |w|*||x|| (Wanda); auto = wanda with data"},
        )
        reconstruct: Literal["auto", "sparsegpt", "none"] = field(
            default="auto",
            metadata={
                "help": "sparsegpt: choose zeros by saliency and refit the surviving weights from the input "
                "Gram matrices (one-shot, no training); auto = sparsegpt with calibration data"
            },
        )
        op_types: list[str] = field(
            default_factory=lambda: list(WEIGHT_INPUT), metadata={"help": "ops whose weights are pruned"}
        )
        layer_sparsity: list[str] = field(
            default_factory=list,
            metadata={"help": "per-layer targets PATTERN=S (names, globs, re:REGEX, op:OpType); later entries win"},
        )
        exclude_nodes: list[str] = field(
            default_factory=list, metadata={"help": "layers kept dense (names, globs, re:REGEX, op:OpType)"}
        )
        keep_first_last: bool = field(
            default=True, metadata={"help": "keep the layers nearest the inputs and the outputs dense"}
        )
        keep_depthwise: bool = field(
            default=True,
            metadata={
                "help": "keep depthwise/grouped Conv weights dense: few weights, each output reads one channel; "
                "false prunes them by Wanda (measured at 50% with --calib: MobileNetV3 file 0.669x -> 0.616x at the "
                "same agreement, SVTR lines 0.757 -> 0.709)"
            },
        )
        min_weights: int = field(default=2048, metadata={"help": "layers with fewer weight elements stay dense"})
        allocation: Literal["auto", "uniform", "sensitivity"] = field(
            default="auto",
            metadata={
                "help": "uniform: every layer at its target; sensitivity: each layer pruned alone at a few levels "
                "and measured on calibration data, then the target spread by least damage per zeroed weight "
                "(same total zeros; kept only when it measures better than uniform); auto = sensitivity with "
                "calibration data and an unstructured pattern"
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
            default=0,
            metadata={
                "help": "allocation=sensitivity: probe the largest this many layers (4 probes each; the others "
                "take the target); 0 = all, the default: at 50%, probing all instead of the 16 largest took "
                "YOLOv8n's F1 0.81 -> 0.90 and DBNet's mask IoU 0.931 -> 0.983 (total 134 -> 160 s, 350 -> 499 s)"
            },
        )
        damping: float = field(default=0.01, metadata={"help": "SparseGPT: added to diag(H), relative to its mean"})
        max_gram_mb: int = field(
            default=1024,
            metadata={"help": "SparseGPT: memory for the input Gram matrices (8 C^2 bytes each); past it, Wanda"},
        )

        def validate(self) -> str | None:
            if not 0.0 <= self.sparsity < 1.0:
                return f"sparsity must be in [0, 1); got {self.sparsity}"
            try:
                nm = parse_nm(self.pattern)
                overrides = parse_levels(self.layer_sparsity, "layer_sparsity", "SPARSITY")
            except ValueError as e:
                return str(e)
            if nm is not None and any(s not in (0.0,) for _, s in overrides):
                return "with an N:M pattern, layer_sparsity may only say PATTERN=0 (keep that layer dense)"
            problem = check_criterion(self.sensitivity_metric, "sensitivity_metric")
            if problem:
                return problem
            if self.sensitivity_samples < 1 or self.sensitivity_layers < 0:
                return "sensitivity_samples must be >= 1 and sensitivity_layers >= 0"
            if self.min_weights < 0 or self.max_gram_mb < 0 or not self.damping > 0:
                return "min_weights and max_gram_mb must be >= 0 and damping > 0"
            unknown = sorted(set(self.op_types) - set(WEIGHT_INPUT))
            if unknown:
                return f"op_types {', '.join(unknown)} are not prunable; choose from {', '.join(WEIGHT_INPUT)}"
            return None

    # ------------------------------------------------------------------------------------------ run
    def run(self, ctx: PassContext) -> PassResult:
        opts = self.options
        result = PassResult()
        nm = parse_nm(opts.pattern)
        data = ctx.calibration is not None
        reconstruct = opts.reconstruct if opts.reconstruct != "auto" else ("sparsegpt" if data else "none")
        importance = opts.importance if opts.importance != "auto" else ("wanda" if data else "magnitude")
        if not data and (reconstruct == "sparsegpt" or importance == "wanda"):
            what = "reconstruct=sparsegpt" if reconstruct == "sparsegpt" else "importance=wanda"
            raise UsageError(f"{self.name}: {what} needs calibration data; give --calib DIR")
        layers = self._layers(ctx, result, nm)
        if not layers:
            result.notes.append("nothing to prune: no layer passed the selection rules (see the skips)")
            return result
        stats = self._statistics(ctx, layers, reconstruct, importance, result)
        cache: dict[tuple[int, float], tuple] = {}

        def prune_at(layer: _Layer, level: float):
            key = (id(layer), level)
            if key not in cache:
                layer.sparsity, target = level, layer.sparsity
                cache[key] = self._prune(
                    layer, np.asarray(peek_values(layer.source.constant)), nm, stats, reconstruct, importance
                )
                layer.sparsity = target
            return cache[key]

        allocate = opts.allocation == "sensitivity" or (opts.allocation == "auto" and data and nm is None)
        losses = self._allocate(ctx, layers, nm, prune_at, result) if allocate else {}
        zeroed = total = 0
        for layer in layers:
            w = peek_values(layer.source.constant)
            if layer.sparsity <= 0:
                result.skip(layer.node, "kept dense by the sensitivity allocation", layer.graph)
                continue
            new, facts = prune_at(layer, layer.sparsity)
            if new is None:
                result.skip(layer.node, facts["why"], layer.graph)
                continue
            if id(layer) in losses:
                facts = facts | {"loss_alone_at_target": round(losses[id(layer)], 5)}
            before = int(np.count_nonzero(w == 0))
            layer.source.constant.values = new.astype(w.dtype)
            zeros = int(np.count_nonzero(new == 0))
            zeroed += zeros - before
            total += new.size
            result.layers.append(facts | {"sparsity": round(zeros / new.size, 4)})
            result.count("layers_pruned")
        result.count("weights_zeroed", zeroed)
        result.count("weights_in_pruned_layers", total)
        result.modified = zeroed > 0 or any(f.get("method") == "sparsegpt" for f in result.layers)
        if total:
            zeros = sum(d["sparsity"] * d["params"] for d in result.layers)
            selected = sum(int(np.prod(x.source.constant.shape)) for x in layers)
            result.notes.append(f"sparsity of the selected layers: {zeros / selected:.3f} over {selected:,} weights")
        return result

    def _allocate(self, ctx, layers: list[_Layer], nm, prune_at, result: PassResult) -> dict[int, float]:
        """Per-layer sparsity from measured sensitivity (``_allocate``); id(layer) -> its loss at the target."""
        opts = self.options
        if ctx.calibration is None or nm is not None:
            result.notes.append("allocation=sensitivity needs calibration data and an unstructured pattern: uniform")
            return {}
        metric = resolve_criterion(opts.sensitivity_metric)
        weights = lambda layer, level: prune_at(layer, level)[0] if level > 0 else peek_values(layer.source.constant)
        free = [x for x in layers if not x.pinned]  # layer_sparsity overrides are the user's word
        if not free:
            return {}
        chosen = allocate_sparsity(
            ctx, free, opts.sparsity, weights, metric, opts.sensitivity_samples, result.notes, opts.sensitivity_layers
        )
        for layer in layers:
            if id(layer) in chosen:
                layer.sparsity = chosen[id(layer)][0]
        return {k: v[1] for k, v in chosen.items()}

    # ------------------------------------------------------------------------------------------ selection
    def _layers(self, ctx: PassContext, result: PassResult, nm: tuple[int, int] | None) -> list[_Layer]:
        opts = self.options
        overrides = parse_levels(opts.layer_sparsity, "layer_sparsity", "SPARSITY")
        found: dict[int, _Layer] = {}
        sites = float_weights(ctx.graph)
        edge = edge_layers(ctx.graph, {id(x.node) for x in sites}) if opts.keep_first_last else set()
        for site in sites:
            g, node, i, src = site.graph, site.node, site.index, site.source
            key = id(src.constant)
            if node.op not in opts.op_types or key in found:
                continue
            shape = [int(d) for d in src.constant.shape]
            size = int(np.prod(shape)) if shape else 1
            target = nm_sparsity(nm) if nm else opts.sparsity
            pinned = False
            for pattern, s in overrides:
                if node_matches(pattern, node):
                    target, pinned = s, True
            why = None
            if any(node_matches(p, node) for p in opts.exclude_nodes):
                why = "excluded by exclude_nodes"
            elif id(node) in edge:
                why = "first or last layer (keep_first_last)"
            elif opts.keep_depthwise and node.op in ("Conv", "ConvTranspose") and int(node.attrs.get("group", 1)) > 1:
                why = "depthwise/grouped Conv (keep_depthwise)"
            elif size < opts.min_weights:
                why = f"{size} weights < min_weights={opts.min_weights}"
            elif target <= 0:
                why = "layer_sparsity says 0"
            if why:
                result.skip(node, why, g)
                continue
            layout = weight_layout(node, i, shape) if node.op != "Gather" else None
            found[key] = _Layer(g, node, i, src, layout, site.readers, target, pinned=pinned)
        return list(found.values())

    def _statistics(self, ctx, layers: list[_Layer], reconstruct: str, importance: str, result: PassResult):
        """One request for every layer's input Gram (SparseGPT) or per-channel input norms (Wanda)."""
        grams: dict[str, object] = {}
        norms: dict[str, int] = {}
        budget = self.options.max_gram_mb * 2**20
        over = 0
        for layer in layers:
            lo = layer.layout
            if lo is None:
                continue
            cols = int(np.prod([layer.source.constant.shape[a] for a in lo.in_axes]))
            if reconstruct == "sparsegpt" and lo.gram is not None and layer.readers == 1:
                have = grams.get(lo.activation)
                if have is None and 8 * cols**2 <= budget:
                    budget -= 8 * cols**2
                    grams[lo.activation] = have = lo.gram
                if have == lo.gram:
                    layer.gram_request = lo.gram
                    continue
                over += 1
            if (reconstruct == "sparsegpt" or importance == "wanda") and norms.get(
                lo.activation, lo.channel_axis
            ) == lo.channel_axis:
                norms[lo.activation] = lo.channel_axis
        if over:
            result.notes.append(f"SparseGPT: {over} layer(s) pruned by Wanda (past max_gram_mb or a clashing input)")
        if not grams and not norms:
            return {}
        return ctx.statistics(StatisticsRequest(grams=grams, norms=norms))

    # ------------------------------------------------------------------------------------------ one layer
    def _prune(self, layer: _Layer, w: np.ndarray, nm, stats, reconstruct: str, importance: str):
        node, lo = layer.node, layer.layout
        facts = {"layer": node.name, "op": node.op, "params": int(w.size)}
        if lo is None:  # an embedding table: no input features, so magnitude over the whole table
            if nm is not None:
                return None, {"why": "N:M needs input channels; an embedding table has none"}
            mask = magnitude_mask(w, layer.sparsity)
            return np.where(mask, 0, w), facts | {"method": "magnitude"}
        order = list(lo.out_axes) + list(lo.in_axes)
        moved = np.transpose(w, order)
        in_shape = moved.shape[len(lo.out_axes) :]
        w2 = moved.reshape(int(np.prod(moved.shape[: len(lo.out_axes)])), -1).astype(np.float64)
        perm = _channel_last_columns(lo, in_shape) if nm is not None else None
        if nm is not None and in_shape[lo.in_axes.index(lo.weight_channel_axis)] % nm[1]:
            return None, {"why": f"{in_shape} input channels are not a multiple of M={nm[1]} for N:M"}
        st = stats.get(lo.activation) if hasattr(stats, "get") else None
        h = None
        if layer.gram_request is not None and st is not None and st.gram is not None and st.gram_rows:
            h = st.gram / st.gram_rows
        if h is not None and h.shape == (w2.shape[1],) * 2:
            p = perm if perm is not None else np.arange(w2.shape[1])
            new_p, _ = sparsegpt(w2[:, p], h[np.ix_(p, p)], layer.sparsity, nm, self.options.damping)
            new2 = np.empty_like(new_p)
            new2[:, p] = new_p
            facts |= {"method": "sparsegpt", "output_error": round(output_error(w2, new2, h), 6)}
        else:
            score = np.abs(w2)
            method = "magnitude"
            norm = _column_norms(node, lo, w, st, w2.shape)
            if norm is not None and (importance == "wanda" or reconstruct == "sparsegpt"):
                score = score * norm
                method = "wanda"
            if nm is not None:
                p = perm
                mask2 = np.empty_like(score, dtype=bool)
                mask2[:, p] = nm_mask(score[:, p], *nm)
            elif method == "wanda":
                mask2 = row_mask(score, layer.sparsity)
            else:
                mask2 = magnitude_mask(score, layer.sparsity)
            new2 = np.where(mask2, 0.0, w2)
            facts |= {"method": method}
        new = new2.reshape(moved.shape).transpose(np.argsort(order))
        return new, facts


# --------------------------------------------------------------------------------------------- helpers
def nm_sparsity(nm: tuple[int, int]) -> float:
    return 1.0 - nm[0] / nm[1]


def _channel_last_columns(lo: WeightLayout, in_shape: tuple[int, ...]) -> np.ndarray:
    """Column order (indices into the Gram-ordered columns) with the input channel varying fastest, so that
    N:M groups are M consecutive channels at one kernel position."""
    idx = np.arange(int(np.prod(in_shape))).reshape(in_shape)
    c = lo.in_axes.index(lo.weight_channel_axis)
    return np.moveaxis(idx, c, -1).reshape(-1)


def _column_norms(node: gs.Node, lo: WeightLayout, w: np.ndarray, st, shape2: tuple[int, int]) -> np.ndarray | None:
    """||x_j|| for every (row, column) of the 2-D view (Wanda's input scale), from the Gram's diagonal or the
    per-channel norms; None when the statistics have neither."""
    if st is None:
        return None
    if st.gram is not None and st.gram_rows and st.gram.shape[0] == shape2[1]:
        return np.sqrt(np.maximum(np.diag(st.gram), 0.0))[None, :]
    norm = getattr(st, "channel_norm", None)
    if norm is None:
        return None
    norm = np.asarray(norm, dtype=np.float64)
    cw = lo.weight_channel_axis
    channels = w.shape[cw]
    group = int(node.attrs.get("group", 1)) if node.op == "Conv" else 1
    if norm.size != channels * group:
        return None
    full = np.ones(w.shape, dtype=np.float64)
    view = [1] * w.ndim
    if group == 1:
        view[cw] = channels
        full = full * norm.reshape(view)
    else:  # grouped Conv: output row o reads the input channels of its group
        out = w.shape[0]
        per_row = norm.reshape(group, channels)[np.arange(out) // (out // group)]  # [O, C/g]
        full = full * per_row.reshape(out, channels, *([1] * (w.ndim - 2)))
    order = list(lo.out_axes) + list(lo.in_axes)
    return np.transpose(full, order).reshape(shape2)
