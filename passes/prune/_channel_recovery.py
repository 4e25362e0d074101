"""Private helper of prune_channels: least-squares recovery of the layers that read pruned channels (ThiNet, Luo et
al. 2017; He et al. 2017, "Channel Pruning"), without training.

A consumer ``y = W x + b`` (Conv: x is the input patch, features ``c * k + j`` for channel c; Gemm / MatMul: the
input vector) loses the features R of the removed channels. With Σ the covariance and μ the mean of x on the
calibration data (the unpruned model), the least-squares best ``W'_K, b'`` for ``y ≈ W'_K x_K + b'`` are

    W'_K = W_K + Δ,   Δ = W_R Σ_RK (Σ_KK + λI)^-1,   b' = b + W_R μ_R - Δ μ_K

(the regression of the lost features on the kept ones, plus the mean shift of what is left out). Where the layer
has no place for a bias (a MatMul without a following constant Add), the uncentered ``E[x x^T]`` takes Σ's place
and b stays. λ = damping * mean(diag Σ_KK) shrinks Δ toward plain deletion where the kept features say little
about the lost ones. Conv patch means are taken as the channel means (exact away from the zero padding).
Depthwise/grouped Convs are not refit: each of their outputs reads one channel (or group), which either stays
whole or goes; the next dense layer is refit in their group instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.calibration_stats import ConvPatches
from onnxslim.graph_edit import constant_source
from onnxslim.weight_layout import conv_patches

from ._channel_apply import Weights
from ._channel_groups import Analysis, Edit, attr, float_const

__all__ = ["Consumer", "consumer_of", "refit"]


@dataclass(eq=False)
class Consumer:
    """A dense layer reading a group's channels: the Gram request of its input and its feature layout."""

    edit: Edit
    tensor: str
    spec: int | ConvPatches
    axis: int  # the input's channel axis (for the means)
    per: int  # features per channel
    features: int


def consumer_of(e: Edit, analysis: Analysis) -> Consumer | None:
    """How the layer of an "in" edit reads its input, or None where no refit applies."""
    node, space = e.node, analysis.spaces[e.space]
    shape = [int(d) for d in constant_source(node.inputs[1]).constant.shape]
    if node.op == "Conv":
        spec = conv_patches(node, shape)
        if spec is None:
            return None
        per = int(np.prod(shape[2:]))
        return Consumer(e, space.tensor.name, spec, 1, per, space.size * per)
    if node.op in ("Gemm", "MatMul"):
        return Consumer(e, space.tensor.name, space.axis, space.axis, 1, space.size)
    return None


def _rows(node: gs.Node, w: np.ndarray) -> np.ndarray:
    """The weight as [outputs, input features]."""
    if node.op == "Conv":
        return w.reshape(w.shape[0], -1)
    if node.op == "Gemm" and int(attr(node, "transB", 0)):
        return w
    return w.T


def _unrows(node: gs.Node, rows: np.ndarray, shape: tuple) -> np.ndarray:
    if node.op == "Conv":
        return rows.reshape(shape)
    if node.op == "Gemm" and int(attr(node, "transB", 0)):
        return rows
    return rows.T


def _bias_slot(node: gs.Node, outputs: int) -> tuple[gs.Node, int, float] | None:
    """(node, input, scale) of the constant that adds to the layer's outputs, per output; None where none can."""
    if node.op == "Conv":
        return node, 2, 1.0
    if node.op == "Gemm":
        alpha, beta = float(attr(node, "alpha", 1.0)), float(attr(node, "beta", 1.0))
        has = len(node.inputs) > 2 and node.inputs[2].name
        shape = list(float_const(node.inputs[2]).constant.shape) if has and float_const(node.inputs[2]) else None
        if beta == 0 or (has and (shape is None or not shape or shape[-1] != outputs)):
            return None
        return node, 2, alpha / beta
    out = node.outputs[0]
    if len(out.outputs) != 1 or out.outputs[0].op != "Add":
        return None
    add = out.outputs[0]
    for i, t in enumerate(add.inputs):
        src = float_const(t) if t is not out else None
        if src is not None:
            shape = [int(d) for d in src.constant.shape]
            if shape and shape[-1] == outputs and all(d == 1 for d in shape[:-1]):
                return add, i, 1.0
    return None


def refit(c: Consumer, removed: np.ndarray, stats, weights: Weights, damping: float) -> bool:
    """Refit the consumer's kept weights (and bias) for its input losing channels ``removed``; False where the
    statistics do not allow it (nothing changed then)."""
    st = stats.get(c.tensor) if stats is not None else None
    if st is None or st.gram is None or not st.gram_rows or st.gram.shape != (c.features, c.features):
        return False
    node = c.edit.node
    w = weights.get(node, 1)
    rows = _rows(node, w)
    if rows.shape[1] != c.features:
        return False
    rf = (np.asarray(removed)[:, None] * c.per + np.arange(c.per)[None, :]).reshape(-1)
    kf = np.setdiff1d(np.arange(c.features), rf)
    if not len(kf):
        return False
    slot = _bias_slot(node, rows.shape[0])
    sigma = st.gram / st.gram_rows
    mu = None
    if slot is not None:
        if st.channel_mean is None or len(st.channel_mean) * c.per != c.features:
            slot = None
        else:
            mu = np.repeat(np.nan_to_num(st.channel_mean), c.per)
            sigma = sigma - np.outer(mu, mu)
    a = sigma[np.ix_(kf, kf)].copy()
    scale = float(np.mean(np.diag(a)))
    if not np.isfinite(scale) or scale <= 0 or not np.isfinite(sigma).all():
        return False
    a[np.diag_indices_from(a)] += damping * scale
    rhs = rows[:, rf] @ sigma[np.ix_(rf, kf)]
    try:
        delta = np.linalg.solve(a, rhs.T).T
    except np.linalg.LinAlgError:
        return False
    new = rows.copy()
    new[:, kf] += delta
    weights.set(node, 1, _unrows(node, new, w.shape))
    if slot is not None:
        owner, i, k = slot
        shift = k * (rows[:, rf] @ mu[rf] - delta @ mu[kf])
        if i < len(owner.inputs) and owner.inputs[i].name or weights.has(owner, i):
            b = weights.get(owner, i)
        else:
            b = np.zeros(rows.shape[0])
        weights.set(owner, i, b + shift.reshape([1] * (b.ndim - 1) + [-1]))
    return True
