"""How a layer's weight meets its input, per op, in one table (for every family that changes weights).

``weight_layout(node, i, shape)`` says, for weight input ``i`` of ``node`` (of this shape): which weight axes index
the layer's outputs (rows) and which its input features (columns, flattened in the order of the input's Gram
matrix), which activation those features come from, the Gram request that describes them (a feature axis, or the
patches of a group-1 Conv), and the activation's channel axis (per-channel norms). GPTQ rounding, SparseGPT and
Wanda pruning, and codebook refits read it; a new op is one entry in ``_LAYOUTS``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import onnx_graphsurgeon as gs

from .calibration_stats import ConvPatches

__all__ = ["WeightLayout", "weight_layout", "conv_patches"]


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
