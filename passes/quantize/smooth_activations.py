"""smooth_activations: SmoothQuant-style scale migration from activations into the next layers' weights (exact).

Transformer activations carry a few outlier channels (LayerNorm outputs 10-100x larger in some channels than in
the rest), so one int8 scale per activation tensor spends its range on them and rounds the other channels to a
handful of levels. For ``Y = X W`` (MatMul/Gemm with a constant weight) and any ``s_j > 0``,
``Y = (X diag(1/s)) (diag(s) W)``: dividing input channel j of X by ``s_j`` and multiplying row j of W by it
leaves Y unchanged. The division is folded into the op that makes X when that op is affine per channel along
X's last axis: ``LayerNormalization`` (its scale and bias), or a ``Mul`` by a constant (a decomposed LayerNorm's
gamma), optionally followed by ``Add``s of constants (its beta). With ``s_j = max|X_j|^alpha / max|W_j|^(1 -
alpha)`` (Xiao et al. 2023, "SmoothQuant"; ``max|X_j|`` from the calibration data, ``max|W_j|`` over every layer
reading X) the activation's channel ranges and the weights' row ranges meet halfway, and both quantize with less
error. Run it before quantize_int8_static (``-p smooth_activations --quantize int8``); it changes nothing a float
runtime can see, up to float rounding.

Preconditions for a tensor X: every reader is a MatMul/Gemm taking X as its first input (Gemm with transA=0) with
a float32 constant 2-D weight, or a Shape; X is no graph output; the producing chain's constants broadcast along
the last axis only; each intermediate tensor of the chain has that chain as its sole reader. Constants shared
with other nodes are copied, never edited in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.calibration_service import StatisticsRequest
from onnxslim.graph_edit import const_value, node_matches, producer
from onnxslim.pass_base import Pass, PassContext, PassResult, iter_graphs

__all__ = ["SmoothActivations"]


@dataclass
class _Fold:
    """A constant input of the producing chain that takes ``values / s`` (broadcast along the last axis)."""

    node: gs.Node
    index: int


@dataclass
class _Site:
    graph: gs.Graph
    x: gs.Variable
    layers: list[gs.Node]
    folds: list[_Fold]
    channels: int


def _row_axis(layer: gs.Node) -> int:
    """The weight axis that runs over the input channels (rows of ``X @ W``)."""
    return 1 if layer.op == "Gemm" and int(layer.attrs.get("transB", 0)) else 0


def _layer_weight(layer: gs.Node, x: gs.Tensor) -> np.ndarray | None:
    if layer.domain or len(layer.inputs) < 2 or layer.inputs[0] is not x or layer.inputs[1] is x:
        return None
    if layer.op == "Gemm" and int(layer.attrs.get("transA", 0)):
        return None
    if layer.op not in ("MatMul", "Gemm"):
        return None
    w = const_value(layer.inputs[1])  # an initializer, a Constant node or an outer-scope constant
    return w if w is not None and w.dtype == np.float32 and w.ndim == 2 else None


def _per_channel_const(t: gs.Tensor, channels: int, rank: int | None) -> bool:
    """A constant that broadcasts along the last axis only (shape [..., 1, C] or [..., 1, 1]) and does not add
    dimensions to the result."""
    v = const_value(t)
    if v is None or v.dtype != np.float32 or v.ndim == 0:
        return v is not None and v.dtype == np.float32
    if rank is not None and v.ndim > rank:
        return False
    return all(d == 1 for d in v.shape[:-1]) and v.shape[-1] in (1, channels)


class SmoothActivations(Pass):
    """Move activation outlier scales into the next MatMul/Gemm weights (SmoothQuant; exact in float)."""

    name = "smooth_activations"
    exact = True
    needs_calibration = True
    runs_before = ("quantize_int8_static", "share_weights", "prune_by_magnitude", "distill_layers")

    @dataclass
    class Options:
        alpha: float = field(
            default=0.5,
            metadata={"help": "migration strength: 0 = none, 1 = all of the activation's range into the weights"},
        )
        min_ratio: float = field(
            default=4.0,
            metadata={
                "help": "smooth a tensor only when its largest channel range is at least this many times its "
                "median channel range (no outliers, nothing to gain)"
            },
        )
        exclude_nodes: list[str] = field(
            default_factory=list, metadata={"help": "layers (MatMul/Gemm) whose input is left alone"}
        )

        def validate(self) -> str | None:
            if not 0.0 <= self.alpha <= 1.0:
                return f"alpha must be in [0, 1]; got {self.alpha}"
            if self.min_ratio < 1.0:
                return f"min_ratio must be >= 1; got {self.min_ratio}"
            return None

    def run(self, ctx: PassContext) -> PassResult:
        result = PassResult()
        sites = [s for g in iter_graphs(ctx.graph) for s in self._sites(g, ctx, result)]
        if not sites:
            return result
        stats = ctx.statistics(StatisticsRequest(per_channel={s.x.name: -1 for s in sites}))
        for site in sites:
            st = stats.get(site.x.name)
            if st is None or st.channel_max is None or st.channel_max.shape[0] != site.channels:
                result.skip(
                    site.layers[0], f"no per-channel range of '{site.x.name}' in the calibration run", site.graph
                )
                continue
            act = np.maximum(np.abs(st.channel_min), np.abs(st.channel_max))
            s = self._scales(site, act)
            if s is None:
                result.count("tensors_without_outliers")
                continue
            self._apply(ctx, site, s)
            result.count("tensors_smoothed")
            result.count("layers_smoothed", len(site.layers))
            result.modified = True
        return result

    def _scales(self, site: _Site, act: np.ndarray) -> np.ndarray | None:
        live = act[np.isfinite(act) & (act > 0)]
        if live.size == 0 or live.max() < self.options.min_ratio * np.median(live):
            return None
        rows = np.max(
            [np.abs(const_value(lay.inputs[1])).max(axis=1 - _row_axis(lay)) for lay in site.layers], axis=0
        ).astype(np.float64)
        a = self.options.alpha
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            s = act.astype(np.float64) ** a / rows ** (1.0 - a)
        # Dead channels and degenerate rows keep their scale; the clip keeps float32 far from under/overflow.
        s = np.clip(np.where(np.isfinite(s) & (s > 0), s, 1.0), 1e-4, 1e4)
        # Balanced already (a second run: s = 1 up to the float rounding of the first): leave it, idempotent.
        return None if np.abs(np.log(s)).max() < 1e-3 else s

    def _apply(self, ctx: PassContext, site: _Site, s: np.ndarray) -> None:
        editor = ctx.edit(site.graph)
        for f in site.folds:
            v = const_value(f.node.inputs[f.index]).astype(np.float64)
            shape = (*([1] * max(v.ndim - 1, 0)), site.channels)  # a scalar or [..., 1] grows to C channels
            new = (np.broadcast_to(v, shape) / s).astype(np.float32)
            editor.set_constant_input(f.node, f.index, new, f"{site.x.name}_smoothed")
        for lay in site.layers:
            w = const_value(lay.inputs[1]).astype(np.float64)
            grid = s.reshape(-1, 1) if _row_axis(lay) == 0 else s.reshape(1, -1)
            editor.set_constant_input(lay, 1, (w * grid).astype(np.float32), f"{lay.name}_weight_smoothed")
        editor.commit()

    def _sites(self, graph: gs.Graph, ctx: PassContext, result: PassResult) -> list[_Site]:
        editor = ctx.edit(graph)
        seen: set[int] = set()
        out: list[_Site] = []
        for node in graph.nodes:
            if node.op not in ("MatMul", "Gemm") or not node.inputs or id(node.inputs[0]) in seen:
                continue
            x = node.inputs[0]
            seen.add(id(x))
            if not isinstance(x, gs.Variable) or editor.is_output(x):
                continue
            layers = [r for r in x.outputs if r.op in ("MatMul", "Gemm")]
            others = [r for r in x.outputs if r.op not in ("MatMul", "Gemm")]
            weights = [_layer_weight(r, x) for r in layers]
            if any(w is None for w in weights) or any(r.op != "Shape" or r.domain for r in others):
                continue
            if any(node_matches(p, r) for p in self.options.exclude_nodes for r in layers):
                continue
            channels = {int(w.shape[_row_axis(r)]) for r, w in zip(layers, weights)}
            if len(channels) != 1:
                continue
            c = channels.pop()
            folds = self._chain(x, c, editor)
            if folds is None:
                result.skip(node, f"'{x.name}' comes from no per-channel affine op to fold the scales into", graph)
                continue
            out.append(_Site(graph, x, layers, folds, c))
        return out

    @staticmethod
    def _chain(x: gs.Tensor, channels: int, editor) -> list[_Fold] | None:
        """The constants to divide: walk back through Add(const)s to a Mul(const) or a LayerNormalization."""
        rank = len(x.shape) if x.shape is not None else None
        folds: list[_Fold] = []
        t = x
        while True:
            p = producer(t)
            if p is None or p.domain or not editor.owns(p):
                return None
            if p.op == "LayerNormalization":
                axis = int(p.attrs.get("axis", -1))
                if not (axis == -1 or (rank is not None and axis == rank - 1)):
                    return None
                idx = [i for i in (1, 2) if i < len(p.inputs) and p.inputs[i].name]
                if any(not _per_channel_const(p.inputs[i], channels, rank) for i in idx) or 1 not in idx:
                    return None
                return folds + [_Fold(p, i) for i in idx]
            if p.op not in ("Mul", "Add") or len(p.inputs) != 2:
                return None
            k = next((i for i in (1, 0) if const_value(p.inputs[i]) is not None), None)
            if k is None or not _per_channel_const(p.inputs[k], channels, rank):
                return None
            folds.append(_Fold(p, k))
            if p.op == "Mul":
                return folds
            t = p.inputs[1 - k]
            if editor.sole_consumer(t) is not p:
                return None
