"""prune_channels: structured pruning: delete whole output channels of Conv (grouped and depthwise too) and output
neurons of Gemm/MatMul (MLP hidden units), and shrink every layer that reads them, so the model really gets
cheaper (fewer MACs and parameters, lower latency), not just sparser (lossy).

Which channels go together (``_channel_groups`` / ``_channel_rules``): one analysis over the main graph ties each
channel of a layer's output to where it travels: BatchNormalization and per-channel constants ([C,1,1] / [C]
operands of Add/Mul/Sub/Div/PRelu...: sliced), element-wise activations, pools, Resize, Dropout, Identity,
Transpose/Squeeze/Unsqueeze/Slice/Pad that keep the channel axis whole (passed through), residual Add/Mul of two
activations (SiLU ``x * sigmoid(x)``, hard-swish, the squeeze-and-excitation gate: both sides lose the same
channels), Concat and Split along the channels (by offsets; Split sizes are rewritten), depthwise / grouped Convs
(a group goes as a whole: its weight rows go and ``group`` drops), Flatten / Reshape into a Gemm or MatMul (a
channel takes its static spatial block of the flattened features along) and the layers that read them (input
channels of the next Conv / Gemm / MatMul). A *group* is pruned by one fraction of its channels; each set of
channels that appear in the same tensors (a Concat's inputs, a Split's parts) loses that fraction on its own,
rounded to keep ``channel_multiple``.

Left alone, with the reason in the report (skips): groups reaching a graph output, an op the analysis does not
follow (Shape, Gather, LayerNormalization over the channels, Einsum, custom domains...), a subgraph (If/Loop
bodies are not pruned), a computed (non-constant) weight, bias or per-channel operand (run fold_constants first:
the default pipeline does), a Reshape with a computed shape or one that splits the channel axis (attention heads:
the Q/K/V ``[B,T,H,D]`` reshape blocks the projections; head pruning is not done), grouped Convs whose input
cannot follow, ``exclude_nodes``, and with ``keep_first_last`` the groups produced by a layer that reads a graph
input (the stem: few channels, each feeding everything after it).

Importance of a channel: ``l1`` / ``l2``: the norm of its producers' output weights (times |gamma / sqrt(var)| of
a BatchNormalization right after), summed over the group's producers; ``activation``: sum over the layers reading
it of ``||x_c|| * ||W[:, c]||`` (its measured contribution on calibration data). ``auto`` = activation with
calibration data, else l2. With calibration data, ``recovery`` (``_channel_recovery``) refits the layers that
read pruned channels by least squares so their outputs match the unpruned model. All statistics come from ONE
run of the shared statistics service on the graph as it is before the pass edits it.

Measured at fraction 0.3 (onnxruntime 1 thread, x86 AVX2): YOLOv8n (NudeNet) 42 of 47 groups pruned, MACs 0.51x,
latency 0.78x (0.69x with channel_multiple=8), output cosine 0.977 without data; with channel_multiple=8 0.966,
and 0.997 with activation importance and recovery on 16 calibration images. RapidOCR's MobileNetV3 classifier
(after fold_constants): 23 of 26 groups, MACs 0.60x, latency 1.03x with channel_multiple=1 but 0.76x with 8
(onnxruntime's blocked NCHWc CPU convs want channel counts in multiples of 8: give channel_multiple=8, 16 on
AVX-512, when latency is the goal); top-1 agreement with the original 0.30 without data, 0.88 with recovery: a
small classifier loses accuracy at 30% of every layer without fine-tuning (use lower or per-layer fractions).
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from onnxslim.calibration_service import StatisticsRequest
from onnxslim.errors import UsageError
from onnxslim.graph_edit import node_matches, peek_values
from onnxslim.pass_base import Pass, PassContext, PassResult
from onnxslim.sensitivity import check_criterion, resolve_criterion
from onnxslim.shape_inference import infer_graph_types

from ._channel_allocate import allocate_fractions
from ._channel_apply import Weights, apply_removal, channel_norms, count_macs
from ._channel_groups import Analysis, Group, float_const
from ._channel_recovery import Consumer, consumer_of, refit
from ._channel_rules import handler_of
from ._layer_rules import parse_levels

__all__ = ["PruneChannels"]

log = logging.getLogger(__name__)


class PruneChannels(Pass):
    """Remove whole channels of Conv / Gemm / MatMul layers and shrink their readers (lossy, structured)."""

    name = "prune_channels"
    exact = False
    runs_before = (
        "prune_by_magnitude",
        "share_weights",
        "quantize_int8_static",
        "distill_layers",
        "pack_sparse_weights",
    )
    needs_calibration = False
    idempotent = False
    metric_floors = {"cosine": 0.9}

    @dataclass
    class Options:
        fraction: float = field(default=0.3, metadata={"help": "fraction of the channels removed in each group"})
        criterion: Literal["auto", "l1", "l2", "activation"] = field(
            default="auto",
            metadata={
                "help": "channel importance: weight norms, or ||x_c||*||W[:,c]|| on data; auto = activation "
                "with calibration data, else l2"
            },
        )
        recovery: Literal["auto", "least_squares", "none"] = field(
            default="auto",
            metadata={
                "help": "refit the layers reading pruned channels by least squares on calibration data; "
                "auto = least_squares with data"
            },
        )
        exclude_nodes: list[str] = field(
            default_factory=list,
            metadata={"help": "groups with such a producer or reader are left alone (names, globs, re:, op:)"},
        )
        layer_fraction: list[str] = field(
            default_factory=list,
            metadata={
                "help": "per-producer fractions PATTERN=FRACTION (later entries win; a group takes the "
                "smallest of its producers')"
            },
        )
        keep_first_last: bool = field(
            default=True,
            metadata={"help": "leave alone the groups produced by a layer reading a graph input (outputs always are)"},
        )
        channel_multiple: int = field(
            default=8,
            metadata={
                "help": "kept channel counts stay multiples of this: onnxruntime's blocked CPU convolutions want 8 "
                "(AVX2; RapidOCR MobileNetV3 at 0.3: 1.03x fp32 latency with 1, 0.76x with 8); 1 = exact fractions"
            },
        )
        allocation: Literal["auto", "uniform", "sensitivity"] = field(
            default="auto",
            metadata={
                "help": "sensitivity: each group pruned alone at a few fractions and measured on calibration data, "
                "then the weights to remove spread by least damage (same total; kept only when it measures "
                "better than uniform); auto = sensitivity with calibration data"
            },
        )
        sensitivity_metric: str = field(
            default="decisions",
            metadata={"help": "allocation: cosine, decisions, or script.py:function(reference, candidate)"},
        )
        sensitivity_samples: int = field(default=8, metadata={"help": "allocation: calibration samples compared"})
        sensitivity_groups: int = field(
            default=16, metadata={"help": "allocation: probe the largest this many groups (0 = all); others: fraction"}
        )
        damping: float = field(default=0.01, metadata={"help": "recovery: ridge on diag(Sigma), relative to its mean"})
        max_gram_mb: int = field(
            default=1024,
            metadata={
                "help": "recovery: memory for the input Gram matrices (8 F^2 bytes per layer with F input "
                "features); layers past it are not refit"
            },
        )

        def validate(self) -> str | None:
            if not 0 <= self.fraction < 1:
                return f"fraction must be in [0, 1); got {self.fraction}"
            if self.channel_multiple < 1:
                return f"channel_multiple must be >= 1; got {self.channel_multiple}"
            problem = check_criterion(self.sensitivity_metric, "sensitivity_metric")
            if problem:
                return problem
            if self.sensitivity_samples < 1 or self.sensitivity_groups < 0:
                return "sensitivity_samples must be >= 1 and sensitivity_groups >= 0"
            if self.damping < 0 or self.max_gram_mb < 0:
                return "damping and max_gram_mb must be >= 0"
            try:
                parse_levels(self.layer_fraction, "layer_fraction", "FRACTION")
            except ValueError as e:
                return str(e)
            return None

    def run(self, ctx: PassContext) -> PassResult:
        opts, result, graph = self.options, PassResult(), ctx.graph
        with_data = ctx.calibration is not None
        criterion = opts.criterion if opts.criterion != "auto" else ("activation" if with_data else "l2")
        recovery = opts.recovery if opts.recovery != "auto" else ("least_squares" if with_data else "none")
        if not with_data and (criterion == "activation" or recovery == "least_squares"):
            raise UsageError(
                f"{self.name}: criterion=activation and recovery=least_squares need calibration data; give --calib "
                "DIR (or calibration=...)"
            )
        types = infer_graph_types(graph, ctx.opset)
        analysis = Analysis(graph, ctx.opset, types).run(handler_of)
        groups = analysis.groups()
        plan: list[tuple[Group, float]] = []
        for g in groups:
            self._screen(g, graph)
            if g.reasons:
                result.skip(_head(g, analysis), "; ".join(dict.fromkeys(g.reasons[:3])))
                continue
            fraction = self._fraction(g)
            if fraction > 0:
                plan.append((g, fraction))
        result.count("groups_blocked", sum(1 for g in groups if g.reasons))
        if not plan:
            return self._summary(result, groups)
        consumers = [c for g, _ in plan for e in g.edits if e.role == "in" and (c := consumer_of(e, analysis))]
        removed: dict[int, np.ndarray] = {}
        stats = None
        if criterion == "activation":  # the scores need the data: one request for scores and refits
            stats = self._statistics(ctx, analysis, plan, consumers, criterion, recovery, result)
        scores = {id(g): self._scores(g, analysis, criterion, stats, result) for g, _ in plan}
        choose = lambda g, fraction: self._choose(g, analysis, scores[id(g)], fraction)
        if opts.allocation == "sensitivity" or (opts.allocation == "auto" and with_data):
            fractions = allocate_fractions(
                ctx,
                plan,
                choose,
                resolve_criterion(opts.sensitivity_metric),
                opts.sensitivity_samples,
                result.notes,
                opts.sensitivity_groups,
            )
            plan = [(g, fractions.get(id(g), f)) for g, f in plan]
        for g, fraction in plan:
            removed.update(choose(g, fraction))
        if not any(len(r) for r in removed.values()):
            return self._summary(result, groups)
        if criterion != "activation" and recovery == "least_squares":  # Grams only where channels go
            consumers = [c for c in consumers if len(removed.get(c.edit.space, ()))]
            stats = self._statistics(ctx, analysis, plan, consumers, criterion, recovery, result)
        before = count_macs(graph, types)
        weights = Weights()
        if recovery == "least_squares":
            refit_layers = 0
            for c in consumers:
                r = removed.get(c.edit.space)
                if r is not None and len(r) and refit(c, r, stats, weights, opts.damping):
                    refit_layers += 1
            result.count("layers_refit", refit_layers)
        editor = ctx.edit(graph)
        params = apply_removal(editor, analysis, [g for g, _ in plan], removed, weights)
        editor.commit()
        self._record(result, analysis, plan, removed)
        result.count("params_removed", params)
        after = count_macs(graph, infer_graph_types(graph, ctx.opset))
        if before[0] and not before[1] and not after[1]:
            result.count("macs_before", before[0])
            result.count("macs_after", after[0])
        elif before[1]:
            result.notes.append(f"MACs not counted: {before[1]} layer(s) have dynamic shapes (fix the input shape)")
        result.modified = True
        return self._summary(result, groups)

    def _record(self, result: PassResult, analysis: Analysis, plan, removed: dict[int, np.ndarray]) -> None:
        """Counts, and one per-layer row for each layer whose output channels were pruned."""
        outs: dict[int, object] = {}
        for g, _ in plan:
            for e in g.edits:
                if e.role == "out":
                    outs.setdefault(e.space, e.node)
        for s, node in outs.items():
            n, gone = analysis.spaces[s].size, len(removed.get(s, ()))
            if gone:
                result.layers.append(
                    {"name": node.name, "op": node.op, "channels_before": n, "channels_after": n - gone}
                )
        result.count("channels_removed", sum(len(removed.get(s, ())) for s in outs))
        result.count("groups_pruned", sum(1 for g, _ in plan if any(len(removed.get(s, ())) for s in g.spaces)))

    # ------------------------------------------------------------------------------------------ policy
    def _screen(self, g: Group, graph) -> None:
        """Add the option-made reasons to leave a group alone."""
        layers = [e.node for e in g.edits if e.role in ("out", "in", "grouped")]
        hit = next((n for n in layers for p in self.options.exclude_nodes if node_matches(p, n)), None)
        if hit is not None:
            g.reasons.append(f"'{hit.name}' is in exclude_nodes")
        if self.options.keep_first_last:
            inputs = {id(t) for t in graph.inputs}
            first = next((e.node for e in g.edits if e.role == "out" and id(e.node.inputs[0]) in inputs), None)
            if first is not None:
                g.reasons.append(f"produced by '{first.name}', which reads a graph input (keep_first_last)")

    def _fraction(self, g: Group) -> float:
        entries = parse_levels(self.options.layer_fraction, "layer_fraction", "FRACTION")
        found = []
        for e in g.edits:
            if e.role == "out":
                hits = [f for p, f in entries if node_matches(p, e.node)]
                if hits:
                    found.append(hits[-1])
        return min(found) if found else self.options.fraction

    def _statistics(self, ctx, analysis: Analysis, plan, consumers: list[Consumer], criterion, recovery, result):
        """Everything the run needs from calibration data, as ONE request (one streaming run)."""
        norms: dict[str, int] = {}
        if criterion == "activation":
            for g, _ in plan:
                for e in g.edits:
                    if e.role == "in":
                        s = analysis.spaces[e.space]
                        norms[s.tensor.name] = s.axis
        grams: dict = {}
        means: dict[str, int] = {}
        if recovery == "least_squares":
            budget, big, clash = self.options.max_gram_mb * 2**20, 0, 0
            for c in consumers:
                if c.tensor in grams:
                    clash += grams[c.tensor] != c.spec  # one input read by Convs of other geometries
                    continue
                if 8 * c.features**2 > budget:
                    big += 1
                    continue
                budget -= 8 * c.features**2
                grams[c.tensor], means[c.tensor] = c.spec, c.axis
            if big or clash:
                result.notes.append(
                    f"recovery: {big} layer(s) past max_gram_mb and {clash} reading an input another layer "
                    "reads with other Conv geometry are not refit"
                )
        if not (norms or grams):
            return None
        return ctx.statistics(StatisticsRequest(norms=norms, grams=grams, means=means))

    def _scores(self, g: Group, analysis: Analysis, criterion: str, stats, result: PassResult) -> dict[int, float]:
        """Importance of each unit of the group (higher = keep)."""
        scores = dict.fromkeys(g.units, 0.0)
        if criterion == "activation":
            terms = []
            for e in g.edits:
                if e.role != "in":
                    continue
                s = analysis.spaces[e.space]
                st = stats.get(s.tensor.name) if stats is not None else None
                norm = None if st is None else st.channel_norm
                if norm is None or len(norm) != s.size:
                    terms = None
                    break
                w = channel_norms(peek_values(float_const(e.node.inputs[1]).constant), e.axis)
                terms.append((s, np.nan_to_num(norm) * w))
            if terms is not None:
                return _accumulate(scores, analysis, terms)
            result.notes.append("activation importance: a layer input had no statistics; l2 used for its group")
        p = 1 if criterion == "l1" else 2
        terms = []
        for e in g.edits:
            if e.role == "out":
                s = analysis.spaces[e.space]
                w = channel_norms(peek_values(float_const(e.node.inputs[e.input]).constant), e.axis, p)
                terms.append((s, w * _bn_scale(s.tensor, s.size)))
        return _accumulate(scores, analysis, terms)

    def _choose(self, g: Group, analysis: Analysis, scores: dict[int, float], fraction: float) -> dict[int, np.ndarray]:
        """The channels to remove, per space: in each set of units that share the same tensors, the lowest."""
        atoms: dict[tuple[int, ...], list[int]] = {}
        for root, elems in g.units.items():
            atoms.setdefault(tuple(sorted({s for s, _ in elems})), []).append(root)
        m = self.options.channel_multiple
        gone: set[int] = set()
        for roots in atoms.values():
            n = len(roots)
            keep = n - math.floor(fraction * n + 1e-9)
            if m > 1:
                keep = n if n <= m else min(n, max(m, int(keep / m + 0.5) * m))  # nearest, halves up
            order = sorted(roots, key=lambda r: (scores[r], r))
            gone.update(order[: n - keep])
        out: dict[int, list[int]] = {s: [] for s in g.spaces}
        for root in gone:
            for s, i in g.units[root]:
                out[s].append(i)
        return {s: np.array(sorted(v), dtype=np.int64) for s, v in out.items()}

    def _summary(self, result: PassResult, groups: list[Group]) -> PassResult:
        blocked = [g for g in groups if g.reasons]
        if blocked:
            kinds = Counter(_kind(g.reasons[0]) for g in blocked)
            result.notes.append(
                f"{len(blocked)} of {len(groups)} channel group(s) left alone: "
                + ", ".join(f"{k} ({n})" for k, n in kinds.most_common())
            )
        return result


def _accumulate(scores: dict[int, float], analysis: Analysis, terms) -> dict[int, float]:
    for s, values in terms:
        for i, v in enumerate(values.tolist()):
            root = analysis.find(s.base + i)
            scores[root] = scores.get(root, 0.0) + float(v)
    return scores


def _bn_scale(t, size: int) -> np.ndarray:
    """|gamma| / sqrt(var + eps) of the BatchNormalization that alone reads ``t`` (ones when there is none)."""
    if len(t.outputs) == 1 and t.outputs[0].op == "BatchNormalization" and len(t.outputs[0].inputs) == 5:
        bn = t.outputs[0]
        gamma, var = (float_const(bn.inputs[i]) for i in (1, 4))
        if (
            gamma is not None
            and var is not None
            and tuple(gamma.constant.shape) == tuple(var.constant.shape) == (size,)
        ):
            eps = float(bn.attrs.get("epsilon", 1e-5))
            return np.abs(peek_values(gamma.constant).astype(np.float64)) / np.sqrt(
                np.maximum(peek_values(var.constant).astype(np.float64), 0) + eps
            )
    return np.ones(size)


def _head(g: Group, analysis: Analysis):
    """The node a group's skip is reported on: its first producer."""
    e = next((e for e in g.edits if e.role in ("out", "grouped")), None)
    if e is not None:
        return e.node
    return analysis.spaces[g.spaces[0]].tensor.inputs[0]


def _kind(reason: str) -> str:
    """A reason without its names, to count alike ones."""
    return re.sub(r"'[^']*'", "'…'", reason)
