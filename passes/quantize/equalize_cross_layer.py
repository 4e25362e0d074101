"""equalize_cross_layer: data-free cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization", §4.1).

For ``y = L2(relu(L1(x)))`` with weighted layers L1, L2 (Conv, Gemm, or a 2-D MatMul weight): scaling
output channel i of L1 (its weight row and bias) by ``1/s_i`` and input channel i of L2 by ``s_i`` leaves y
unchanged for every ``s_i > 0``, because ReLU is positively homogeneous: ``relu(z / s) = relu(z) / s``.
Choosing ``s_i = sqrt(r1_i / r2_i)`` (r1_i: max |weight| of L1's output channel i, r2_i: max |weight| of L2's
input channel i) makes both ranges ``sqrt(r1_i r2_i)``, so per-tensor (and better-balanced per-channel)
int8 weight grids waste less of their range on a few large channels. Chains (L1 -> L2 -> L3) are swept until
the scales settle. Run it before quantize_int8_static; it is not in the default pipeline (it changes
nothing a float runtime can see).

Preconditions: L1's output feeds only the ReLU, the ReLU's output feeds only L2, neither is a graph output;
L1's weight (and bias) and L2's weight are float32 constants read by that layer alone; grouped Conv
channels are matched per group. Exact up to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.graph_edit import peek_values
from onnxslim.pass_base import Pass, PassContext, PassResult

__all__ = ["EqualizeCrossLayer"]

_LAYERS = ("Conv", "Gemm", "MatMul")


def _weight(node: gs.Node) -> gs.Constant | None:
    if node.op not in _LAYERS or node.domain or len(node.inputs) < 2:
        return None
    w = node.inputs[1]
    if not isinstance(w, gs.Constant) or np.dtype(w.dtype) != np.float32 or len(w.outputs) != 1:
        return None
    if node.op == "Conv" and len(w.shape) < 3:
        return None
    if node.op in ("Gemm", "MatMul") and len(w.shape) != 2:
        return None
    if node.op == "Gemm" and int(node.attrs.get("transA", 0)):
        return None
    return w


def _out_axis(node: gs.Node) -> int:
    if node.op == "Conv":
        return 0
    if node.op == "Gemm":
        return 0 if int(node.attrs.get("transB", 0)) else 1
    return 1


def _bias(node: gs.Node) -> gs.Constant | None | bool:
    """L1's bias constant, None when it has none, False when it has one this pass cannot scale."""
    if node.op == "MatMul" or len(node.inputs) < 3 or not node.inputs[2].name:
        return None
    b = node.inputs[2]
    if not isinstance(b, gs.Constant) or np.dtype(b.dtype) != np.float32 or len(b.shape) != 1 or len(b.outputs) != 1:
        return False
    return b


def _input_scale_grid(node: gs.Node, w: np.ndarray, s: np.ndarray) -> np.ndarray | None:
    """The factor each element of L2's weight gets when its input channel i is scaled by s_i."""
    if node.op == "Conv":
        n, cg = w.shape[0], w.shape[1]
        group = int(node.attrs.get("group", 1))
        if cg * group != s.shape[0] or n % group:
            return None
        grid = s.reshape(group, cg)[np.arange(n) // (n // group)]  # [N, C/g]
        return grid.reshape(n, cg, *([1] * (w.ndim - 2)))
    in_axis = 1 - _out_axis(node)
    if w.shape[in_axis] != s.shape[0]:
        return None
    return s.reshape(-1, 1) if in_axis == 0 else s.reshape(1, -1)


def _in_ranges(node: gs.Node, w: np.ndarray, channels: int) -> np.ndarray | None:
    """max |w| per input channel of L2 (grouped Conv: each channel appears in one group)."""
    ones = np.ones(channels, dtype=np.float64)
    grid = _input_scale_grid(node, w, ones)
    if grid is None:
        return None
    if node.op == "Conv":
        n, cg = w.shape[0], w.shape[1]
        group = channels // cg
        per = np.abs(w).reshape(n, cg, -1).max(axis=2)  # [N, C/g]
        return per.reshape(group, n // group, cg).max(axis=1).reshape(-1)
    return np.abs(w).max(axis=_out_axis(node))


@dataclass
class _Pair:
    l1: gs.Node
    l2: gs.Node


class EqualizeCrossLayer(Pass):
    """Balance weight ranges across Conv/Gemm/MatMul -> Relu -> Conv/Gemm/MatMul pairs (exact)."""

    name = "equalize_cross_layer"
    exact = True

    @dataclass
    class Options:
        max_sweeps: int = field(default=50, metadata={"help": "sweeps over the pairs (chains need several)"})
        tolerance: float = field(
            default=1e-3,
            metadata={
                "help": "a pair counts as changed when some |log s_i| exceeds this (sweeps continue to tolerance/100)"
            },
        )

        def validate(self) -> str | None:
            if self.max_sweeps < 1:
                return f"max_sweeps must be >= 1; got {self.max_sweeps}"
            if not 0 < self.tolerance < 1:
                return f"tolerance must be in (0, 1); got {self.tolerance}"
            return None

    def run_graph(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        pairs = self._pairs(graph)
        if not pairs:
            return result
        # Work on float64 copies; write back once (constants stay lazy until a pair really needs them).
        w: dict[int, np.ndarray] = {}
        b: dict[int, np.ndarray] = {}
        for p in pairs:
            for n in (p.l1, p.l2):
                w.setdefault(id(n), peek_values(n.inputs[1]).astype(np.float64))
            bias = _bias(p.l1)
            if isinstance(bias, gs.Constant):
                b.setdefault(id(p.l1), peek_values(bias).astype(np.float64))
        log_s_max: dict[int, float] = {}
        for _ in range(self.options.max_sweeps):
            worst = 0.0
            for p in pairs:
                w1, w2 = w[id(p.l1)], w[id(p.l2)]
                ax = _out_axis(p.l1)
                r1 = np.abs(np.moveaxis(w1, ax, 0)).reshape(w1.shape[ax], -1).max(axis=1)
                r2 = _in_ranges(p.l2, w2, w1.shape[ax])
                with np.errstate(divide="ignore", invalid="ignore"):
                    s = np.sqrt(r1 / r2)
                s = np.where(np.isfinite(s) & (s > 0), s, 1.0)  # dead channels keep their scale
                shape = [1] * w1.ndim
                shape[ax] = -1
                w1 /= s.reshape(shape)
                if id(p.l1) in b:
                    b[id(p.l1)] /= s
                w[id(p.l2)] = w2 * _input_scale_grid(p.l2, w2, s)
                step = float(np.abs(np.log(s)).max(initial=0.0))
                log_s_max[id(p.l1)] = max(log_s_max.get(id(p.l1), 0.0), step)
                worst = max(worst, step)
            if worst < self.options.tolerance / 100:
                break
        changed = [p for p in pairs if log_s_max.get(id(p.l1), 0.0) > self.options.tolerance]
        if not changed:
            return result
        touched = {id(n) for p in changed for n in (p.l1, p.l2)}
        for p in pairs:
            for n in (p.l1, p.l2):
                if id(n) in touched:
                    n.inputs[1].values = w[id(n)].astype(np.float32)
            if id(p.l1) in touched and id(p.l1) in b:
                p.l1.inputs[2].values = b[id(p.l1)].astype(np.float32)
        result.count("pairs_equalized", len(changed))
        result.modified = True
        return result

    def _pairs(self, graph: gs.Graph) -> list[_Pair]:
        outputs = {id(t) for t in graph.outputs}
        pairs: list[_Pair] = []
        for relu in graph.nodes:
            if relu.op != "Relu" or relu.domain or len(relu.inputs) != 1 or len(relu.outputs) != 1:
                continue
            z, a = relu.inputs[0], relu.outputs[0]
            if len(z.inputs) != 1 or len(z.outputs) != 1 or len(a.outputs) != 1 or id(z) in outputs or id(a) in outputs:
                continue
            l1, l2 = z.inputs[0], a.outputs[0]
            if l1 is l2 or _weight(l1) is None or _weight(l2) is None or l2.inputs[0] is not a:
                continue
            if _bias(l1) is False or l1.outputs[0] is not z:
                continue
            w1, w2 = l1.inputs[1], l2.inputs[1]
            channels = int(w1.shape[_out_axis(l1)])
            bias = _bias(l1)
            if bias is not None and int(bias.shape[0]) != channels:
                continue  # a broadcast bias cannot take per-channel scales
            if _in_ranges(l2, np.zeros(w2.shape, np.float32), channels) is None:
                continue
            pairs.append(_Pair(l1, l2))
        return pairs
