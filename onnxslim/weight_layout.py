"""How a layer's weight meets its input, per op, in one table (for every family that changes weights).

``weight_layout(node, i, shape)`` says, for weight input ``i`` of ``node`` (of this shape): which weight axes index
the layer's outputs (rows) and which its input features (columns, flattened in the order of the input's Gram
matrix), which activation those features come from, the Gram request that describes them (a feature axis, or the
patches of a group-1 Conv), and the activation's channel axis (per-channel norms). GPTQ rounding, SparseGPT and
Wanda pruning, and codebook refits read it; a new op is one entry in ``_LAYOUTS``. ``float_weights`` finds the
layers whose float constant weights a compression pass may rewrite, ``edge_layers`` the first and last of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from .calibration_stats import ConvPatches
from .graph_edit import ConstantSource, constant_source, iter_graphs

__all__ = [
    "WeightLayout",
    "weight_layout",
    "conv_patches",
    "WEIGHT_INPUT",
    "RNN_WEIGHT_INPUTS",
    "WeightSite",
    "float_weights",
    "edge_layers",
]


@dataclass(frozen=True)
class WeightLayout:
    out_axes: tuple[int, ...]  # weight axes of the layer's output features (rows)
    in_axes: tuple[int, ...]  # weight axes of the input features (columns; flattened = the Gram's order)
    activation: str  # the tensor those input features come from
    gram: int | ConvPatches | None  # its Gram request (None: the features are not a Gram of one tensor)
    channel_axis: int  # the activation's channel axis (per-channel norms)
    weight_channel_axis: int  # the weight axis indexed by the activation's channel (grouped Conv: per group)


def conv_patches(node: gs.Node, wshape: list[int]) -> ConvPatches | None:
    """The patch geometry of a group-1 Conv with explicit (or no) padding; None otherwise."""
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if int(node.attrs.get("group", 1)) != 1 or auto_pad not in ("NOTSET", "VALID"):
        return None
    kernel = tuple(int(k) for k in wshape[2:])
    k = len(kernel)
    strides = tuple(int(v) for v in node.attrs.get("strides", [1] * k))
    dilations = tuple(int(v) for v in node.attrs.get("dilations", [1] * k))
    pads = tuple(int(v) for v in node.attrs.get("pads", [0] * 2 * k)) if auto_pad == "NOTSET" else (0,) * (2 * k)
    if len(strides) != k or len(dilations) != k or len(pads) != 2 * k:
        return None
    return ConvPatches(kernel, strides, pads, dilations)


def _matmul(node, i, shape):
    x = node.inputs[0]
    if i != 1 or len(shape) != 2 or not x.name:
        return None
    return WeightLayout((1,), (0,), x.name, -1, -1, 0)


def _gemm(node, i, shape):
    x = node.inputs[0]
    if i != 1 or len(shape) != 2 or not x.name:
        return None
    trans_b = int(node.attrs.get("transB", 0))
    x_axis = 0 if int(node.attrs.get("transA", 0)) else 1
    return WeightLayout(
        (0,) if trans_b else (1,), (1,) if trans_b else (0,), x.name, x_axis, x_axis, 1 if trans_b else 0
    )


def _conv(node, i, shape):
    x = node.inputs[0]
    if i != 1 or len(shape) < 3 or not x.name:
        return None
    spec = conv_patches(node, shape) if len(shape) in (3, 4) else None
    return WeightLayout((0,), tuple(range(1, len(shape))), x.name, spec, 1, 1)


def _conv_transpose(node, i, shape):
    x = node.inputs[0]
    if i != 1 or len(shape) < 3 or not x.name:
        return None
    return WeightLayout(tuple(range(1, len(shape))), (0,), x.name, None, 1, 0)


def _rnn(node, i, shape):
    """W reads the input X; R reads the hidden state, i.e. the Y output at every step (the zero initial state
    adds nothing). GRU's R multiplies ``r * h`` unless linear_before_reset=1, which is not exposed."""
    if len(shape) != 3:
        return None
    x = node.inputs[0]
    if i == 1 and x.name:
        return WeightLayout((0, 1), (2,), x.name, -1, -1, 2)
    if (
        i == 2
        and node.outputs
        and node.outputs[0].name
        and (node.op != "GRU" or int(node.attrs.get("linear_before_reset", 0)) == 1)
    ):
        return WeightLayout((0, 1), (2,), node.outputs[0].name, -1, -1, 2)
    return None


_LAYOUTS: dict[str, Callable[[gs.Node, int, list[int]], WeightLayout | None]] = {
    "MatMul": _matmul,
    "Gemm": _gemm,
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "LSTM": _rnn,
    "GRU": _rnn,
    "RNN": _rnn,
}


def weight_layout(node: gs.Node, i: int, shape: list[int]) -> WeightLayout | None:
    """The layout of weight input ``i`` (of this shape) of ``node``; None where the op has no such weight."""
    fn = None if node.domain not in (None, "", "ai.onnx") else _LAYOUTS.get(node.op)
    return fn(node, i, [int(d) for d in shape]) if fn is not None else None


# ------------------------------------------------------------------------------------------ which weights
# The weight input of each layer op that compression passes rewrite (pruning, weight sharing).
WEIGHT_INPUT: dict[str, int] = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1, "Gather": 0}
# Recurrent layers' input (W) and recurrence (R) weights, for the passes that take them (weight sharing).
RNN_WEIGHT_INPUTS: dict[str, tuple[int, ...]] = {"LSTM": (1, 2), "GRU": (1, 2), "RNN": (1, 2)}
_FLOATS = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.float64))


@dataclass(frozen=True)
class WeightSite:
    """A layer reading a float constant weight: where it is, the constant, and how many layers read it."""

    graph: gs.Graph
    node: gs.Node
    index: int
    source: ConstantSource
    readers: int


def float_weights(
    root: gs.Graph,
    accept: Callable[[gs.Node], bool] | None = None,
    inputs: dict[str, tuple[int, ...]] | None = None,
) -> list[WeightSite]:
    """Every layer of ``WEIGHT_INPUT`` (or of ``inputs``: op -> weight input indices; main graph and If/Loop/Scan
    bodies) whose weight is a float constant (initializer, ``Constant`` node, outer-scope constant), in graph
    order; ``accept`` filters the nodes."""
    table = inputs if inputs is not None else {op: (i,) for op, i in WEIGHT_INPUT.items()}
    found = []
    for g in iter_graphs(root):
        for node in g.nodes:
            if node.op not in table or node.domain not in (None, "", "ai.onnx"):
                continue
            if accept is not None and not accept(node):
                continue
            for i in table[node.op]:
                src = constant_source(node.inputs[i]) if len(node.inputs) > i and node.inputs[i].name else None
                if src is not None and np.dtype(src.constant.dtype) in _FLOATS:
                    found.append((g, node, i, src))
    readers: dict[int, int] = {}
    for *_, src in found:
        readers[id(src.constant)] = readers.get(id(src.constant), 0) + 1
    return [WeightSite(g, n, i, s, readers[id(s.constant)]) for g, n, i, s in found]


def edge_layers(graph: gs.Graph, layer_ids: set[int]) -> set[int]:
    """Layers of the main graph with no other layer before them (first) or after them (last)."""
    edge: set[int] = set()
    for nodes, ins, outs in ((graph.nodes, "inputs", "outputs"), (graph.nodes[::-1], "outputs", "inputs")):
        reached: set[int] = set()
        for n in nodes:
            hit = any(id(t) in reached for t in getattr(n, ins))
            if id(n) in layer_ids:
                if not hit:
                    edge.add(id(n))
                reached.update(id(t) for t in getattr(n, outs))
            elif hit:
                reached.update(id(t) for t in getattr(n, outs))
    return edge
