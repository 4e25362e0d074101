"""fuse_pad_into_conv: fold a spatial constant ``Pad`` into the ``pads`` of the Conv/pool that reads it.

Conv(Pad(x, p, 0)) = Conv(x) with pads += p, since Conv pads with zeros. Pools pad differently, so:
- AveragePool: the Pad's zeros count as elements, so the fused pool needs count_include_pad=1; fused when
  the pool already has count_include_pad=1, or has no pads of its own (then it is switched to 1).
- MaxPool: pool padding acts as -inf, so only a Pad with constant value -inf is fused (Indices unused).
Pools with ceil_mode=1 are skipped (windows past the edge are treated differently there).

Preconditions: Pad mode 'constant' (value 0; -inf for MaxPool) with constant non-negative pads that touch
only spatial dims (axis >= 2); the Pad output read by that one node, as its data input; auto_pad NOTSET.
Exact (the same arithmetic on the same values).
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.graph_edit import GraphEditor, const_value
from onnxslim.pass_base import PassContext, PassResult

from ._fusion_helpers import FusionPass

__all__ = ["FusePadIntoConv"]

_TARGETS = ("Conv", "ConvTranspose", "AveragePool", "MaxPool")


def _pad_spec(pad: gs.Node, opset: int) -> tuple[list[int], float] | str:
    """(pads over all dims [b1.., e1..], constant value), or why it can't be read."""
    mode = pad.attrs.get("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode != "constant":
        return f"mode '{mode}' is not constant padding"
    if "pads" in pad.attrs:  # opset < 11
        return [int(v) for v in pad.attrs["pads"]], float(pad.attrs.get("value", 0.0))
    pads = const_value(pad.inputs[1]) if len(pad.inputs) > 1 else None
    if pads is None:
        return "pads are not constant"
    value = 0.0
    if len(pad.inputs) > 2 and pad.inputs[2].name != "":
        v = const_value(pad.inputs[2])
        if v is None or v.size != 1:
            return "constant_value is not a constant scalar"
        value = float(v.reshape(-1)[0])
    pads = [int(p) for p in pads.reshape(-1)]
    if len(pad.inputs) > 3 and pad.inputs[3].name != "":
        axes = const_value(pad.inputs[3])
        rank = len(pad.inputs[0].shape) if pad.inputs[0].shape is not None else None
        if axes is None or rank is None:
            return "axes are not constant or the input rank is unknown"
        axes = [int(a) % rank for a in axes.reshape(-1)]
        full = [0] * (2 * rank)
        for k, a in enumerate(axes):
            full[a], full[rank + a] = pads[k], pads[len(axes) + k]
        pads = full
    return pads, value


class FusePadIntoConv(FusionPass):
    """Fold a zero (or -inf for MaxPool) spatial Pad into the following Conv's or pool's pads."""

    name = "fuse_pad_into_conv"

    def fuse_graph(self, edit: GraphEditor, ctx: PassContext) -> PassResult:
        graph = edit.graph
        result = PassResult()
        for pad in [n for n in graph.nodes if n.op == "Pad" and not n.domain]:
            target = edit.sole_consumer(pad.outputs[0])
            if target is None or target.op not in _TARGETS or target.domain or not edit.owns(target):
                continue
            reason = self._fuse(edit, pad, target, ctx.opset)
            if reason:
                result.skip(pad, f"not fused into {target.op} '{target.name}': {reason}", graph)
                continue
            edit.remove_node(pad)
            result.count(f"fused_into_{target.op.lower()}")
            result.modified = True
        return result

    def _fuse(self, edit: GraphEditor, pad: gs.Node, node: gs.Node, opset: int) -> str | None:
        if node.inputs[0] is not pad.outputs[0] or any(t is pad.outputs[0] for t in node.inputs[1:]):
            return "the Pad output is not only the data input"
        if node.op == "ConvTranspose":
            return "ConvTranspose pads crop the output; a Pad on its input is not equivalent"
        spec = _pad_spec(pad, opset)
        if isinstance(spec, str):
            return spec
        pads, value = spec
        rank = len(pads) // 2
        if rank < 3 or any(p < 0 for p in pads):
            return "negative pads or rank < 3"
        if any(pads[i] or pads[rank + i] for i in (0, 1)):
            return "pads touch the batch or channel dim"
        auto_pad = node.attrs.get("auto_pad", "NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        if auto_pad != "NOTSET":
            return f"auto_pad={auto_pad}"
        nsp = rank - 2
        old = [int(v) for v in node.attrs.get("pads", [0] * (2 * nsp))]
        if len(old) != 2 * nsp:
            return "pads of a different rank"
        if node.op == "Conv":
            if value != 0.0:
                return f"pad value {value} is not 0"
        elif node.op == "AveragePool":
            if value != 0.0:
                return f"pad value {value} is not 0"
            if int(node.attrs.get("ceil_mode", 0)):
                return "ceil_mode=1"
            if not int(node.attrs.get("count_include_pad", 0)) and any(old):
                return "count_include_pad=0 with pads of its own: the Pad's zeros would stop being counted"
        elif node.op == "MaxPool":
            if not (math.isinf(value) and value < 0):
                return f"pad value {value} is not -inf (MaxPool pads act as -inf)"
            if int(node.attrs.get("ceil_mode", 0)):
                return "ceil_mode=1"
            if len(node.outputs) > 1 and not edit.outputs_unused(node):
                return "MaxPool Indices output is used (indices would shift)"
        new = [old[i] + pads[2 + i] for i in range(nsp)] + [old[nsp + i] + pads[rank + 2 + i] for i in range(nsp)]
        node.attrs["pads"] = [int(v) for v in np.asarray(new)]
        if node.op == "AveragePool":
            node.attrs["count_include_pad"] = 1
        node.inputs[0] = pad.inputs[0]
        return None
