"""Private helpers of quantize_int8_static: quantization parameters and the arrays they produce.

Activations: affine uint8 (or int8) from a calibrated range widened to include 0 (so 0 is exact, which
zero padding and ReLU rely on): ``scale = (hi - lo) / 255``, ``zp = round(qmin - lo / scale)``.
Weights: symmetric int8 in [-127, 127] (zero point 0; -128 unused so int8 x uint8 dot products cannot
overflow the 16-bit intermediate some kernels use), per channel along ``axis`` or per tensor.
Bias: int32 with ``scale = input_scale * weight_scale`` and zero point 0 (what QLinearConv/QGemm expect).
"""

from __future__ import annotations

import numpy as np

__all__ = ["activation_qparams", "quantize_weight", "quantize_bias", "fake_quant_activation", "WEIGHT_QMAX"]

WEIGHT_QMAX = 127
_MIN_SCALE = np.float32(1e-12)


def activation_qparams(lo: float, hi: float, signed: bool) -> tuple[np.float32, np.ndarray]:
    """(scale, zero_point) for an activation whose calibrated range is [lo, hi]."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise ValueError(f"calibrated range [{lo}, {hi}] is not finite")
    scale = np.float32((hi - lo) / 255.0)
    if scale <= _MIN_SCALE:  # a constant-zero tensor: any scale represents it exactly
        scale = np.float32(1.0)
    qmin, qmax = (-128, 127) if signed else (0, 255)
    zp = int(np.clip(np.round(qmin - lo / float(scale)), qmin, qmax))
    return scale, np.array(zp, dtype=np.int8 if signed else np.uint8)


def fake_quant_activation(x: np.ndarray, scale: float, zp: np.ndarray) -> np.ndarray:
    """QuantizeLinear then DequantizeLinear, as ONNX defines them (round half to even, saturate)."""
    info = np.iinfo(zp.dtype)
    q = np.clip(np.round(x / np.float32(scale)) + int(zp), info.min, info.max)
    return ((q - int(zp)) * np.float32(scale)).astype(np.float32)


def quantize_weight(w: np.ndarray, axis: int | None, qmax: int = WEIGHT_QMAX) -> tuple[np.ndarray, np.ndarray]:
    """(int8 values, float32 scale): symmetric in [-qmax, qmax], per channel along ``axis`` or per tensor when
    None (``qmax=63``: onnxruntime's reduce_range, 7-bit weights)."""
    w = np.asarray(w, dtype=np.float32)
    if axis is None:
        scale = np.array(np.abs(w).max() / qmax if w.size else 1.0, dtype=np.float32)
        scale = np.where(scale > _MIN_SCALE, scale, np.float32(1.0)).astype(np.float32)
        q = np.clip(np.round(w / scale), -qmax, qmax).astype(np.int8)
        return q, scale.reshape(())
    reduce = tuple(i for i in range(w.ndim) if i != axis)
    scale = (np.abs(w).max(axis=reduce) / qmax).astype(np.float32) if w.size else np.ones(w.shape[axis], np.float32)
    scale = np.where(scale > _MIN_SCALE, scale, np.float32(1.0)).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape)), -qmax, qmax).astype(np.int8)
    return q, scale


def quantize_bias(b: np.ndarray, x_scale: np.float32, w_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(int32 values, float32 scale) for a bias, or None when it would overflow int32."""
    scale = np.asarray(np.float32(x_scale) * np.asarray(w_scale, dtype=np.float32), dtype=np.float32)
    if np.any(scale <= 0):
        return None
    q = np.round(np.asarray(b, dtype=np.float64) / scale.astype(np.float64))
    if not np.all(np.isfinite(q)) or np.abs(q).max(initial=0) > 2**31 - 1:
        return None
    return q.astype(np.int32), scale
