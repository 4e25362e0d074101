"""Optimal-brain-surgeon helpers shared by every pass that changes weights column by column from calibration data
(GPTQ rounding, SparseGPT pruning, codebook assignment): the damped inverse of the input second-moment matrix,
as the upper Cholesky factor those algorithms push each column's error through.
"""

from __future__ import annotations

import numpy as np

__all__ = ["neutral_dead_columns", "inverse_factor"]


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
