"""Private helper of quantize_int8_static: what quantization knows about each op, in one table.

Adding an op to the quantizer is one ``OPS`` entry: its role, which inputs are weights, the per-channel axis
of a weight, the bias input, the axis of the input whose channels feed the weight (bias-correction means, GPTQ
Gram matrices), and how GPTQ sees the weight. The planner, the rewriter, bias correction, GPTQ and the
precision ladder all read this table.

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

from onnxslim.calibration_stats import ConvPatches

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
    # GPTQ: (the weight's input-feature axes, the activation whose Gram is wanted, its Gram request) for weight
    # input i of rank r, or None where GPTQ does not apply (it then rounds to nearest).
    gptq: Callable[[gs.Node, int, list[int]], tuple[tuple[int, ...], str, object] | None] | None = None
    default: bool = True  # in the pass's default op_types
    quantized_output: bool = False  # pools whose output gets Q/DQ too (QLinear(Global)AveragePool)
    # A weighted layer that onnxruntime runs in int8 only when its output is quantized too (QLinearConv).
    needs_output_q: bool = False


# ---------------------------------------------------------------------------------------- per-op rules
def _gemm_in_axis(node: gs.Node) -> int:
    return 0 if int(node.attrs.get("transA", 0)) else 1


def _matmul_gptq(node, i, shape):
    x = node.inputs[0]
    return ((0,), x.name, -1) if i == 1 and len(shape) == 2 and x.name else None


def _gemm_gptq(node, i, shape):
    x = node.inputs[0]
    if i != 1 or len(shape) != 2 or not x.name:
        return None
    return (1 if int(node.attrs.get("transB", 0)) else 0,), x.name, _gemm_in_axis(node)


def _conv_gptq(node, i, shape):
    x = node.inputs[0]
    if i != 1 or len(shape) not in (3, 4) or not x.name:
        return None
    spec = conv_patches(node, shape)
    return (tuple(range(1, len(shape))), x.name, spec) if spec is not None else None


def _rnn_gptq(node, i, shape):
    """W reads the input X; R reads the hidden state, i.e. the Y output at every step (the zero initial state
    adds nothing). GRU's R multiplies ``r * h`` unless linear_before_reset=1, which is not exposed."""
    if len(shape) != 3:
        return None
    x = node.inputs[0]
    if i == 1 and x.name:
        return (2,), x.name, -1
    if (
        i == 2
        and node.outputs
        and node.outputs[0].name
        and (node.op != "GRU" or int(node.attrs.get("linear_before_reset", 0)) == 1)
    ):
        return (2,), node.outputs[0].name, -1
    return None


def conv_patches(node: gs.Node, wshape: list[int]) -> ConvPatches | None:
    """The patch geometry of a group-1 Conv with explicit (or no) padding; None for what GPTQ leaves alone."""
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
        gptq=_conv_gptq,
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
        gptq=_matmul_gptq,
    ),
    "Gemm": QuantOp(
        "weighted",
        (1,),
        axis=lambda n, r: (0 if int(n.attrs.get("transB", 0)) else 1) if r == 2 else None,
        bias=2,
        in_axis=_gemm_in_axis,
        gptq=_gemm_gptq,
    ),
    "LSTM": QuantOp("recurrent", (1, 2), axis=_rnn_axis, gptq=_rnn_gptq),
    "GRU": QuantOp("recurrent", (1, 2), axis=_rnn_axis, gptq=_rnn_gptq),
    "RNN": QuantOp("recurrent", (1, 2), axis=_rnn_axis, gptq=_rnn_gptq),
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
    """GPTQ's view of weight input ``i`` (of this shape): (input-feature axes, activation, Gram request) or None."""
    q = OPS.get(node.op)
    return q.gptq(node, i, shape) if q is not None and q.gptq is not None else None
