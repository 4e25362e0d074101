"""Optimal-brain-surgeon helpers shared by every pass that changes weights column by column from calibration data
(GPTQ rounding, SparseGPT pruning, codebook assignment): the damped inverse of the input second-moment matrix,
as the upper Cholesky factor those algorithms push each column's error through.
"""

from __future__ import annotations

import logging

import numpy as np

__all__ = ["neutral_dead_columns", "inverse_factor", "gptq_round"]

log = logging.getLogger(__name__)

_BLOCK = 128  # columns per lazy-update block (the usual GPTQ blocking; same result, fewer big updates)


def neutral_dead_columns(hessian: np.ndarray) -> np.ndarray:
    """A float64 copy of ``H = E[x x^T]`` where columns the data never fed (``H_jj = 0``) give and take no error
    (``H_jj := 1``, zero off the diagonal): calibration data may simply never reach them."""
    h = np.array(hessian, dtype=np.float64)
    dead = np.diag(h) <= 0
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    h[dead, dead] = 1.0
    return h


def inverse_factor(h: np.ndarray, damping: float) -> np.ndarray | None:
    """Upper ``U`` with ``(H + damping * mean(diag H) I)^-1 = U^T U``; None when that is not positive definite."""
    h = np.array(h, dtype=np.float64)
    h[np.diag_indices(h.shape[0])] += damping * float(np.mean(np.diag(h)))
    try:
        return np.linalg.cholesky(np.linalg.inv(h)).T
    except np.linalg.LinAlgError:
        return None


def gptq_round(
    w: np.ndarray, scale: np.ndarray, hessian: np.ndarray, qmax: int, damping: float = 0.01, act_order: bool = True
) -> np.ndarray:
    """Integer values (float64 array) for ``w`` [rows, cols] with per-row ``scale``, minimizing
    ``tr((W - W_q) H (W - W_q)^T)``: columns rounded in turn, errors pushed onto later columns via the
    Cholesky factor of ``H^-1`` (blocked lazy updates)."""
    w = w.copy()
    h = neutral_dead_columns(hessian)  # a column nobody feeds: rounded to nearest, takes and gives no error
    n = w.shape[1]
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(n)
    w, h = w[:, perm], h[np.ix_(perm, perm)]
    pruned = w == 0  # a pruned weight stays zero (its error, once others moved it, is pushed on like any other)
    hinv = inverse_factor(h, damping)
    if hinv is None:
        log.debug("GPTQ: H is not positive definite after damping; rounding to nearest")
        return np.clip(np.round(w[:, np.argsort(perm)] / scale[:, None]), -qmax, qmax)
    q = np.zeros_like(w)
    for b0 in range(0, n, _BLOCK):
        b1 = min(b0 + _BLOCK, n)
        wb = w[:, b0:b1].copy()
        err = np.zeros_like(wb)
        hb = hinv[b0:b1, b0:b1]
        for j in range(b1 - b0):
            col = wb[:, j]
            qc = np.where(pruned[:, b0 + j], 0.0, np.clip(np.round(col / scale), -qmax, qmax))
            q[:, b0 + j] = qc
            e = (col - qc * scale) / hb[j, j]
            wb[:, j:] -= np.outer(e, hb[j, j:])
            err[:, j] = e
        w[:, b1:] -= err @ hinv[b0:b1, b1:]
    return q[:, np.argsort(perm)]
