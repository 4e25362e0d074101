"""Private helper of quantize_int8_static: what quantization knows about each op, in one table.

Adding an op to the quantizer is one ``OPS`` entry: its role, which inputs are weights, the per-channel axis
of a weight, the bias input, the axis of the input whose channels feed the weight (bias-correction means);
how a weight meets its input (GPTQ's Gram matrices) is ``onnxslim.weight_layout``. The planner, the
rewriter, bias correction, GPTQ and the precision ladder all read this table.

Roles: ``weighted`` (int8 weights and quantized activations; onnxruntime fuses them into integer kernels),
``recurrent`` (int8 weights only: onnxruntime has no QDQ kernels for RNNs), ``table`` (int8 embedding tables,
weights only),
``elementwise`` / ``single_input`` pass-through (Q/DQ on the inputs only where they come from quantized nodes,
so the runtime keeps the chain in int8).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import onnx_graphsurgeon as gs

from onnxslim.weight_layout import weight_layout

__all__ = [
    "QuantOp",
    "OPS",
    "DEFAULT_OP_TYPES",
    "TRANSPARENT",
    "ops_with_role",
    "weight_axis",
    "input_axis",
    "gram_request",
    "FOLLOWING_ADD",
]

FOLLOWING_ADD = -1  # ``QuantOp.bias``: the bias is the constant of the Add that alone reads the output (MatMul)

# Ops a quantized value passes through unchanged in kind (onnxruntime folds them into the int8 chain).
TRANSPARENT = frozenset({"Relu", "Clip", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "MaxPool"})


def _no_axis(node: gs.Node, rank: int) -> int | None:
    return None


@dataclass(frozen=True)
class QuantOp:
    role: str  # "weighted" | "recurrent" | "table" | "elementwise" | "single_input"
    weights: tuple[int, ...] = ()  # inputs that hold weights (quantized when float32 constants)
    # Per-channel axis of a weight of rank r (None: per tensor); weight-only layers may use it at any opset.
    axis: Callable[[gs.Node, int], int | None] = _no_axis
    bias: int | None = None  # input with the per-output-channel bias (int32 when quantized), or FOLLOWING_ADD
    # Axis of input 0 along which its channels meet the weight's input features (means for bias correction,
    # the Gram matrix for GPTQ); None when neither applies.
    in_axis: Callable[[gs.Node], int] | None = None
    default: bool = True  # in the pass's default op_types
    quantized_output: bool = False  # pools whose output gets Q/DQ too (QLinear(Global)AveragePool)
    # A weighted layer that onnxruntime runs in int8 only when its output is quantized too (QLinearConv).
    needs_output_q: bool = False


# ---------------------------------------------------------------------------------------- per-op rules
def _gemm_in_axis(node: gs.Node) -> int:
    return 0 if int(node.attrs.get("transA", 0)) else 1


def _rnn_axis(node, rank):
    return 1


def _gather_axis(node, rank):
    return int(node.attrs.get("axis", 0)) % max(rank, 1) if rank >= 2 else None


OPS: dict[str, QuantOp] = {
    "Conv": QuantOp(
        "weighted",
        (1,),
        axis=lambda n, r: 0 if r >= 2 else None,
        bias=2,
        in_axis=lambda n: 1,
        needs_output_q=True,
    ),
    "ConvTranspose": QuantOp(
        "weighted",
        (1,),
        axis=lambda n, r: 1 if r >= 2 and int(n.attrs.get("group", 1)) == 1 else None,
        needs_output_q=True,
    ),
    "MatMul": QuantOp(
        "weighted",
        (1,),
        axis=lambda n, r: r - 1 if r >= 2 else None,
        bias=FOLLOWING_ADD,
        in_axis=lambda n: -1,
    ),
    "Gemm": QuantOp(
        "weighted",
        (1,),
        axis=lambda n, r: (0 if int(n.attrs.get("transB", 0)) else 1) if r == 2 else None,
        bias=2,
        in_axis=_gemm_in_axis,
    ),
    "LSTM": QuantOp("recurrent", (1, 2), axis=_rnn_axis),
    "GRU": QuantOp("recurrent", (1, 2), axis=_rnn_axis),
    "RNN": QuantOp("recurrent", (1, 2), axis=_rnn_axis),
    "Gather": QuantOp("table", (0,), axis=_gather_axis),
    # Their output gets Q/DQ too (for readers that are not quantized themselves: Split, Concat into a float
    # tail...), so onnxruntime runs QLinearAdd / QLinearMul (NudeNet YOLOv8n: 45 -> 57 of 61 Mul fused).
    "Add": QuantOp("elementwise", quantized_output=True),
    "Mul": QuantOp("elementwise", quantized_output=True),
    "Concat": QuantOp("elementwise"),
    "MaxPool": QuantOp("single_input"),
    "AveragePool": QuantOp("single_input", quantized_output=True),
    "GlobalAveragePool": QuantOp("single_input", quantized_output=True),
    "Resize": QuantOp("single_input"),
    "GlobalMaxPool": QuantOp("single_input", default=False),
    # Sigmoid between quantized producers and consumers (SiLU = x * sigmoid(x)): QLinearSigmoid + QLinearMul.
    "Sigmoid": QuantOp("single_input"),
}

DEFAULT_OP_TYPES: tuple[str, ...] = tuple(op for op, q in OPS.items() if q.default)


def ops_with_role(*roles: str) -> frozenset[str]:
    return frozenset(op for op, q in OPS.items() if q.role in roles)


def weight_axis(node: gs.Node, rank: int) -> int | None:
    """The per-channel axis of a weight of this rank read by ``node`` (None: one scale for the tensor)."""
    q = OPS.get(node.op)
    return q.axis(node, rank) if q is not None else None


def input_axis(node: gs.Node) -> int | None:
    """The axis of ``node``'s input 0 whose channels meet its weight's input features."""
    q = OPS.get(node.op)
    return q.in_axis(node) if q is not None and q.in_axis is not None else None


def gram_request(node: gs.Node, i: int, shape: list[int]):
    """GPTQ's view of weight input ``i`` (of this shape): (input-feature axes, activation, Gram request) or None
    (``onnxslim.weight_layout`` knows how each op's weight meets its input)."""
    layout = weight_layout(node, i, shape) if node.op in OPS else None
    if layout is None or layout.gram is None:
        return None
    return layout.in_axes, layout.activation, layout.gram
