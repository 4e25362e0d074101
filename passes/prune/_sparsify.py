"""Private helper of prune_by_magnitude: which weights of one layer become zero, and what the others become.

Every function works on a layer's weight viewed as ``[rows, cols]``: rows are output features, columns input
features in the order of the input's Gram matrix ``H = E[x x^T]`` (``onnxslim.weight_layout``).

- ``magnitude_mask``: the ``ceil(s * n)`` smallest ``|w|`` of the whole layer (Han et al. 2015).
- ``row_mask``: per output row, the ``ceil(s * cols)`` smallest scores; with ``|w| * ||x_j||`` this is Wanda
  (Sun et al. 2023), which compares weights within one output, where the input's scale is shared.
- ``nm_mask``: at most N non-zeros in every M consecutive columns of a row (2:4, 4:8), smallest scores zeroed.
- ``sparsegpt``: SparseGPT (Frantar & Alistarh 2023), one-shot optimal-brain-surgeon pruning: columns are
  visited in order; in each block of columns the mask is chosen by ``w^2 / [H^-1]_jj^2`` (the OBS saliency), and
  each column's pruning error is pushed onto the columns not yet visited through the Cholesky factor of
  ``H^-1``, so the layer's output on calibration data moves as little as possible. The same machinery GPTQ
  uses for rounding (``passes/quantize/_gptq.py``), here deciding zeros instead of integer levels.

Counts are exact and ties break by position (stable sorts), so a mask is a pure function of its inputs.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from onnxslim.obs import inverse_factor, neutral_dead_columns

__all__ = ["magnitude_mask", "row_mask", "nm_mask", "sparsegpt", "output_error"]

log = logging.getLogger(__name__)

_BLOCK = 128  # columns per SparseGPT block (mask chosen per block; the paper's blocking)


def _smallest(score: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the ``k`` smallest entries of ``score`` (flattened; ties by position)."""
    mask = np.zeros(score.size, dtype=bool)
    if k > 0:
        mask[np.argsort(score.reshape(-1), kind="stable")[:k]] = True
    return mask.reshape(score.shape)


def magnitude_mask(w: np.ndarray, sparsity: float) -> np.ndarray:
    """True where ``w`` is pruned: the ``ceil(sparsity * w.size)`` smallest magnitudes."""
    return _smallest(np.abs(w), math.ceil(sparsity * w.size - 1e-9))


def row_mask(score: np.ndarray, sparsity: float) -> np.ndarray:
    """True where pruned: in each row the ``ceil(sparsity * cols)`` smallest scores."""
    k = math.ceil(sparsity * score.shape[1] - 1e-9)
    if k <= 0:
        return np.zeros(score.shape, dtype=bool)
    order = np.argsort(score, axis=1, kind="stable")[:, :k]
    mask = np.zeros(score.shape, dtype=bool)
    np.put_along_axis(mask, order, True, axis=1)
    return mask


def nm_mask(score: np.ndarray, n: int, m: int) -> np.ndarray:
    """True where pruned: in every group of ``m`` consecutive columns of a row, the ``m - n`` smallest scores
    (so at most ``n`` non-zeros remain). ``cols`` must be a multiple of ``m``."""
    rows, cols = score.shape
    groups = score.reshape(rows, cols // m, m)
    order = np.argsort(groups, axis=2, kind="stable")[:, :, : m - n]
    mask = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(mask, order, True, axis=2)
    return mask.reshape(rows, cols)


def sparsegpt(
    w: np.ndarray, hessian: np.ndarray, sparsity: float = 0.0, nm: tuple[int, int] | None = None, damping: float = 0.01
) -> tuple[np.ndarray, np.ndarray]:
    """(pruned weight, mask) for ``w`` [rows, cols] with input second moments ``hessian`` [cols, cols].

    Unstructured: ``ceil(sparsity * block size)`` zeros per block of columns; ``nm=(n, m)``: at most n non-zeros
    in every m consecutive columns. Columns never fed on the calibration data (``H_jj = 0``) give and take no
    error (their mask falls out of the saliency with ``H_jj := 1``, i.e. by magnitude)."""
    w = np.array(w, dtype=np.float64)
    rows, cols = w.shape
    hinv = inverse_factor(neutral_dead_columns(hessian), damping)  # upper: H^-1 = U^T U
    if hinv is None:
        log.debug("SparseGPT: H is not positive definite after damping; pruning by magnitude")
        mask = nm_mask(np.abs(w), *nm) if nm else magnitude_mask(w, sparsity)
        return np.where(mask, 0.0, w), mask
    block = _BLOCK if nm is None else nm[1] * max(1, _BLOCK // nm[1])
    mask = np.zeros((rows, cols), dtype=bool)
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        wb = w[:, b0:b1].copy()
        hb = hinv[b0:b1, b0:b1]
        d = np.diag(hb)
        mb = np.zeros(wb.shape, dtype=bool)
        if nm is None:
            mb = _smallest(wb**2 / d**2, math.ceil(sparsity * wb.size - 1e-9))
        err = np.zeros_like(wb)
        for j in range(b1 - b0):
            if nm is not None and j % nm[1] == 0:
                mb[:, j : j + nm[1]] = nm_mask(wb[:, j : j + nm[1]] ** 2 / d[j : j + nm[1]] ** 2, *nm)
            col = wb[:, j]
            q = np.where(mb[:, j], 0.0, col)
            e = (col - q) / hb[j, j]
            wb[:, j:] -= np.outer(e, hb[j, j:])
            wb[:, j] = q
            err[:, j] = e
        w[:, b0:b1] = wb
        mask[:, b0:b1] = mb
        w[:, b1:] -= err @ hinv[b0:b1, b1:]
    w[mask] = 0.0
    return w, mask


def output_error(w: np.ndarray, new: np.ndarray, hessian: np.ndarray) -> float:
    """Relative output error of the layer on the calibration inputs: ``tr(dW H dW^T) / tr(W H W^T)``."""
    dw = (np.asarray(new, np.float64) - w).astype(np.float64)
    w = np.asarray(w, np.float64)
    den = float(np.einsum("ij,jk,ik->", w, hessian, w, optimize=True))
    num = float(np.einsum("ij,jk,ik->", dw, hessian, dw, optimize=True))
    return num / den if den > 0 else 0.0
