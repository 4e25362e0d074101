"""Private helper of quantize_int8_static: bias correction (Nagel et al. 2019, "Data-Free Quantization", §4.2).

Rounding a layer's weights changes its output by ``(W_q - W) x``; averaged over the data that is a constant
shift per output channel, ``(W_q - W) E[x]``, which the next layers see as a biased input. Subtracting it from
the layer's bias cancels the mean error exactly (the variance of the error stays):

- Gemm / MatMul (weight [K, N] after transB): ``bias -= alpha * E[x] @ (W_q - W)``, ``E[x]`` per input feature
  (last axis of x; axis 0 with transA). For MatMul the bias is the constant of the Add that alone reads it.
- Conv (weight [M, C/g, k...]): ``bias[m] -= sum_{j,k} (W_q - W)[m, j, k] * E[x][group(m) * C/g + j]``,
  ``E[x]`` per input channel (axis 1). Zero padding makes border outputs see zeros, so there the
  correction is approximate.

``E[x]`` is the per-channel mean of the float model's input activation over the calibration data
(``collect_statistics(..., means=...)``, in the pass's one calibration run). ``W_q`` comes from the same
``WeightQuantizer`` the rewriter uses (nearest or GPTQ rounding), so it is the exact dequantized weight the
quantized model uses.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.graph_edit import peek_values
from onnxslim.pass_base import PassContext, PassResult

from ._gptq import WeightQuantizer
from ._ops import FOLLOWING_ADD, OPS, input_axis
from ._plan import NodePlan, QuantizePlanner

__all__ = ["bias_correction_means", "correct_biases", "weight_error_shift", "shift_bias"]

log = logging.getLogger(__name__)


def weight_error_shift(node: gs.Node, dw: np.ndarray, mu: np.ndarray) -> np.ndarray | None:
    """``(W_q - W) E[x]`` per output channel (float64) for the weight change ``dw`` = W_q - W, or None when the
    shapes do not fit."""
    dw = np.asarray(dw, np.float64)
    if node.op == "Conv":
        if dw.ndim < 3:
            return None
        m, cg = dw.shape[0], dw.shape[1]
        group = int(node.attrs.get("group", 1))
        if mu.shape[0] != cg * group or m % group:
            return None
        per_in = dw.reshape(m, cg, -1).sum(axis=2)  # [M, C/g]
        mu_g = mu.reshape(group, cg)[np.arange(m) // (m // group)]  # the input channels of each output's group
        return (per_in * mu_g).sum(axis=1)
    if dw.ndim != 2:
        return None
    if node.op == "Gemm":
        if int(node.attrs.get("transB", 0)):
            dw = dw.T
        alpha = float(node.attrs.get("alpha", 1.0))
    else:
        alpha = 1.0
    if mu.shape[0] != dw.shape[0]:
        return None
    return alpha * (mu @ dw)


def _bias_slot(p: NodePlan, planner: QuantizePlanner) -> tuple[gs.Node, int] | None:
    """(node, input index) of the float bias that shifts this node's output, when there is a usable one."""
    node = p.node
    if OPS[node.op].bias != FOLLOWING_ADD:
        return (node, p.bias) if p.bias is not None else None
    out = node.outputs[0]
    if len(out.outputs) != 1 or out in p.graph.outputs:
        return None
    add = out.outputs[0]
    if add.op != "Add" or add.domain or len(add.inputs) != 2:
        return None
    k = 1 if add.inputs[0] is out else 0
    b = planner.float_weight(add.inputs[k])
    return (add, k) if b is not None and len(b.shape) == 1 else None


def _corrected(plans: list[NodePlan]) -> list[NodePlan]:
    return [
        p
        for p in plans
        if input_axis(p.node) is not None
        and not p.node.domain
        and 0 in p.activations
        and (any(i == 1 for i, _ in p.weights) or p.codebook == 1)  # a shared weight: corrected as it is stacked
    ]


def bias_correction_means(plans: list[NodePlan]) -> dict[str, int]:
    """Input tensor -> channel axis whose calibrated mean bias correction needs (``collect_statistics(means=)``)."""
    axes: dict[str, int] = {}
    for p in _corrected(plans):
        axes.setdefault(p.node.inputs[0].name, input_axis(p.node))
    return axes


def correct_biases(
    ctx: PassContext,
    stats,
    plans: list[NodePlan],
    planner: QuantizePlanner,
    weights: WeightQuantizer,
    result: PassResult,
    after_gptq: bool = True,
) -> None:
    """Shift the float biases of quantized Conv/Gemm/MatMul nodes by ``-(W_q - W) E[x]`` (before the rewriter
    turns them into int32), ``E[x]`` from ``stats`` (collected with ``means=bias_correction_means(plans)``).
    Layers without a bias are left alone (no sample model has one, so adding a bias was never measured). With
    ``after_gptq=False`` the layers GPTQ rounds are left alone too (GPTQ already minimizes their output error on
    the same data); on the real models that helped one and hurt another, so the default corrects them."""
    todo = _corrected(plans)
    axes = bias_correction_means(plans)
    shifts: list[float] = []
    for p in todo:
        node = p.node
        x = node.inputs[0].name
        if axes[x] != input_axis(node):
            continue  # the same tensor read along another axis (rare): no mean for this reading
        st = stats.get(x)
        mu = None if st is None else st.channel_mean
        if mu is None or not np.all(np.isfinite(mu)):
            continue
        axis = next((a for i, a in p.weights if i == 1), False)
        if axis is False:
            continue  # a shared weight stacked under int8: the rewriter corrects it with its int8 tables
        w = peek_values(planner.constant_of(node.inputs[1])[0]).astype(np.float32)
        if not after_gptq and weights.rounds_with_gptq(w, axis):
            result.count("biases_left_to_gptq")
            continue
        q, scale = weights.quantize(w, axis)
        shape = [1] * w.ndim
        if axis is not None:
            shape[axis] = -1
        wq = q.astype(np.float32) * np.asarray(scale, np.float32).reshape(shape)
        delta = weight_error_shift(node, wq.astype(np.float64) - w, mu.astype(np.float64))
        if delta is not None and shift_bias(ctx, p, planner, delta, result):
            shifts.append(float(np.abs(delta).max(initial=0.0)))
    if shifts:
        log.debug("bias correction: %d layers, largest shift %.3g", len(shifts), max(shifts))


def shift_bias(
    ctx: PassContext, p: NodePlan, planner: QuantizePlanner, delta: np.ndarray, result, in_place: bool = True
) -> bool:
    """Subtract ``delta`` (per output channel) from the plan's float bias; False when it has no usable one.
    ``in_place=False``: always a new constant (a trial copy of the graph shares its constants)."""
    slot = _bias_slot(p, planner)
    if slot is None:
        return False
    owner, idx = slot
    const, const_node, _ = planner.constant_of(owner.inputs[idx])
    b = peek_values(const).astype(np.float64)
    if b.shape != delta.shape:
        return False
    new_values = (b - delta).astype(np.float32)
    readers = const_node.outputs[0].outputs if const_node is not None else const.outputs
    if in_place and len(readers) == 1:
        const.values = new_values  # this node's own bias: change it in place
    else:  # shared with other layers, whose errors differ: a private copy
        owner.inputs[idx] = gs.Constant(ctx.names.fresh(f"{const.name}_corrected"), new_values)
    result.count("biases_corrected")
    return True
