"""Private helper of share_weights: the codebook math of one layer.

A layer's weight is viewed as ``[rows, cols]`` (rows: output features; cols: input features in the order of the
input's Gram matrix ``H = E[x x^T]``, ``onnxslim.weight_layout``). A codebook is ``[R, K]``: one row per output
row (per channel) or ``R = 1`` (one per tensor); codes are ``[rows, cols]`` indices into the row's codebook.

- ``kmeans``: weighted Lloyd in one dimension, from linearly spaced centroids (Deep Compression found linear
  initialization best: it keeps centroids on the rare large weights), vectorized over codebook rows. With
  ``keep_zero`` one centroid is exactly 0 and never moves, and the zeros of ``w`` (pruned) always take it.
- ``compensated_codes``: the codebook form of GPTQ: columns are assigned to their nearest centroid in turn and
  each column's error is pushed onto the columns not yet assigned through the Cholesky factor of ``H^-1``, so
  the layer's output error ``tr(dW H dW^T)`` is what the assignment minimizes, not the weight error.
- ``refit_codebook``: with the codes fixed, the centroids that minimize ``tr((W - C[codes]) H (W - C[codes])^T)``
  (least squares; the framework-free stand-in for Deep Compression's gradient fine-tuning of the centroids).
- Channel scales (``W_r = s_r C[codes_r]``: one codebook for the tensor, one scale per output row): ``row_scales``
  starts each row at ``max |W_r|`` (the codebook then clusters ``W_r / s_r``, whose range is the same for every
  row); ``refit_codebook(scales=...)`` and ``refit_scales`` alternate the two least squares for fixed codes.

Everything is deterministic; ``rng`` only picks the subsample a very large tensor's codebook is fitted on.
"""

from __future__ import annotations

import logging

import numpy as np

from onnxslim.obs import inverse_factor, neutral_dead_columns

__all__ = [
    "kmeans",
    "nearest_codes",
    "compensated_codes",
    "refit_codebook",
    "refit_scales",
    "row_scales",
    "sort_codebook",
    "output_error",
    "decode",
]

log = logging.getLogger(__name__)

_BLOCK = 128  # columns per lazy-update block, as in GPTQ
_FIT_SAMPLES = 1 << 18  # a per-tensor codebook is fitted on at most this many weights (then all are assigned)


def decode(codebook: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """``codebook[row, codes[row, j]]`` for each row (a one-row codebook serves every row)."""
    if codebook.shape[0] == 1:
        return codebook[0][codes]
    return np.take_along_axis(codebook, codes, axis=1)


def nearest_codes(w: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid for every entry of ``w`` ``[rows, m]`` (codebook rows sorted ascending)."""
    rows, k = w.shape[0], codebook.shape[1]
    if k == 1:
        return np.zeros(w.shape, dtype=np.int64)
    mids = (codebook[:, 1:] + codebook[:, :-1]) / 2
    if codebook.shape[0] == 1:
        return np.searchsorted(mids[0], w, side="left").astype(np.int64)
    # All rows in one searchsorted: each row's values and midpoints mapped into its own disjoint interval.
    lo = np.minimum(w.min(axis=1), codebook[:, 0])[:, None]
    span = np.maximum(np.maximum(w.max(axis=1), codebook[:, -1])[:, None] - lo, 1e-30)
    offset = 4.0 * np.arange(rows)[:, None]
    u = (w - lo) / span + offset
    m = np.clip((mids - lo) / span, -1.0, 2.0) + offset
    return (
        np.searchsorted(m.reshape(-1), u.reshape(-1), side="left").reshape(w.shape) - (k - 1) * np.arange(rows)[:, None]
    ).astype(np.int64)


def kmeans(
    w: np.ndarray,
    k: int,
    weights: np.ndarray | None = None,
    keep_zero: bool = False,
    iterations: int = 50,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(codebook ``[R, k]`` sorted, codes ``[rows, m]``) for ``w`` ``[R, m]`` (R = 1: one codebook for all).
    ``weights`` (same shape, >= 0) weigh each entry's squared error."""
    w = np.asarray(w, dtype=np.float64)
    wt = np.ones_like(w) if weights is None else np.broadcast_to(np.asarray(weights, np.float64), w.shape).copy()
    pruned = (w == 0) if keep_zero else np.zeros(w.shape, dtype=bool)
    wt[pruned] = 0.0
    fit, fit_wt = w, wt
    if w.shape[0] == 1 and w.shape[1] > _FIT_SAMPLES:
        pick = np.sort((rng or np.random.default_rng(0)).choice(w.shape[1], _FIT_SAMPLES, replace=False))
        fit, fit_wt = w[:, pick], wt[:, pick]
    live = np.where(fit_wt > 0, fit, np.nan)
    lo, hi = (
        np.nanmin(np.where(np.isnan(live).all(1, keepdims=True), 0, live), axis=1),
        np.nanmax(np.where(np.isnan(live).all(1, keepdims=True), 0, live), axis=1),
    )
    cb = lo[:, None] + (hi - lo)[:, None] * np.linspace(0.0, 1.0, k)[None, :]
    if keep_zero:
        zi = np.argmin(np.abs(cb), axis=1)
        cb[np.arange(cb.shape[0]), zi] = 0.0
        cb.sort(axis=1)
    rows = fit.shape[0]
    flat_row = (np.arange(rows)[:, None] * k) + np.zeros(fit.shape, dtype=np.int64)
    codes = None
    for _ in range(iterations):
        new = nearest_codes(fit, cb)
        if codes is not None and np.array_equal(new, codes):
            break
        codes = new
        idx = (flat_row + codes).reshape(-1)
        mass = np.bincount(idx, weights=fit_wt.reshape(-1), minlength=rows * k).reshape(rows, k)
        total = np.bincount(idx, weights=(fit_wt * fit).reshape(-1), minlength=rows * k).reshape(rows, k)
        cb = np.where(mass > 0, total / np.where(mass > 0, mass, 1.0), cb)  # an empty cluster keeps its centroid
        if keep_zero:
            cb[np.abs(cb) == np.min(np.abs(cb), axis=1, keepdims=True)] = 0.0
        cb.sort(axis=1)
    codes = nearest_codes(w, cb)
    if keep_zero:
        codes[pruned] = zero_index(cb)[np.nonzero(pruned)[0] if cb.shape[0] > 1 else 0]
    return cb, codes


def zero_index(codebook: np.ndarray) -> np.ndarray:
    """Per codebook row, the index of its centroid nearest to zero (exactly zero with ``keep_zero``)."""
    return np.argmin(np.abs(codebook), axis=1)


def compensated_codes(
    w: np.ndarray, hessian: np.ndarray, codebook: np.ndarray, pruned: np.ndarray | None = None, damping: float = 0.01
) -> np.ndarray:
    """Codes for ``w`` ``[rows, cols]`` that minimize ``tr(dW H dW^T)`` greedily: columns in order of decreasing
    ``H_jj``, each assigned to its nearest centroid and its error pushed onto the later columns (GPTQ). Entries of
    ``pruned`` take the zero centroid. Columns the data never fed (``H_jj = 0``) give and take no error."""
    w = np.array(w, dtype=np.float64)
    n = w.shape[1]
    h = neutral_dead_columns(hessian)
    perm = np.argsort(-np.diag(h), kind="stable")
    w, h = w[:, perm], h[np.ix_(perm, perm)]
    pruned = np.zeros(w.shape, dtype=bool) if pruned is None else pruned[:, perm]
    zero = zero_index(codebook)
    hinv = inverse_factor(h, damping)  # upper: H^-1 = U^T U
    if hinv is None:
        log.debug("codebook GPTQ: H is not positive definite after damping; nearest centroids")
        codes = nearest_codes(w, codebook)
        codes = np.where(pruned, zero[:, None] if codebook.shape[0] > 1 else zero[0], codes)
        return codes[:, np.argsort(perm)]
    codes = np.zeros(w.shape, dtype=np.int64)
    for b0 in range(0, n, _BLOCK):
        b1 = min(b0 + _BLOCK, n)
        wb = w[:, b0:b1].copy()
        err = np.zeros_like(wb)
        hb = hinv[b0:b1, b0:b1]
        for j in range(b1 - b0):
            col = wb[:, j]
            c = nearest_codes(col[:, None], codebook)[:, 0]
            c = np.where(pruned[:, b0 + j], zero if codebook.shape[0] > 1 else zero[0], c)
            codes[:, b0 + j] = c
            q = codebook[0][c] if codebook.shape[0] == 1 else codebook[np.arange(len(c)), c]
            e = (col - q) / hb[j, j]
            wb[:, j:] -= np.outer(e, hb[j, j:])
            err[:, j] = e
        w[:, b1:] -= err @ hinv[b0:b1, b1:]
    return codes[:, np.argsort(perm)]


def refit_codebook(
    w: np.ndarray,
    hessian: np.ndarray,
    codes: np.ndarray,
    codebook: np.ndarray,
    keep_zero: bool = False,
    scales: np.ndarray | None = None,
) -> np.ndarray:
    """The codebook minimizing ``tr((W - C[codes]) H (W - C[codes])^T)`` for fixed ``codes``; a zero centroid
    (``keep_zero``) and centroids no entry uses stay as they are. ``scales`` (one codebook only): row r is
    ``scales[r] * C[codes_r]``."""
    w = np.asarray(w, dtype=np.float64)
    h = np.asarray(hessian, dtype=np.float64)
    k = codebook.shape[1]
    shared = codebook.shape[0] == 1
    new = np.array(codebook, dtype=np.float64)
    m_acc = np.zeros((k, k))
    b_acc = np.zeros(k)
    for r in range(w.shape[0]):
        order = np.argsort(codes[r], kind="stable")
        used, starts = np.unique(codes[r][order], return_index=True)
        eh = np.add.reduceat(h[order], starts, axis=0)  # [p, cols]: sum of H's rows per centroid
        m = np.add.reduceat(eh[:, order], starts, axis=1)  # [p, p]
        if shared:
            s = 1.0 if scales is None else float(scales[r])
            m_acc[np.ix_(used, used)] += s * s * m
            b_acc[used] += s * (eh @ w[r])
        else:
            new[r, used] = _solve(m, eh @ w[r], codebook[r, used], keep_zero)
    if shared:
        used = np.nonzero(np.diag(m_acc) > 0)[0]
        new[0, used] = _solve(m_acc[np.ix_(used, used)], b_acc[used], codebook[0, used], keep_zero)
    return new


def sort_codebook(codebook: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A one-row codebook sorted ascending (as ``nearest_codes`` needs it after a refit), its codes remapped."""
    order = np.argsort(codebook[0], kind="stable")
    inverse = np.empty_like(order)
    inverse[order] = np.arange(order.size)
    return codebook[:, order], inverse[codes]


def row_scales(w: np.ndarray) -> np.ndarray:
    """Each row's ``max |w_r|`` (1 for an all-zero row): the start of the channel scales."""
    s = np.max(np.abs(w), axis=1) if w.size else np.ones(w.shape[0])
    return np.where(s > 0, s, 1.0)


def refit_scales(
    w: np.ndarray, q: np.ndarray, scales: np.ndarray, hessian: np.ndarray | None = None, weights=None
) -> np.ndarray:
    """Per row, the scale minimizing ``(w_r - s q_r) H (w_r - s q_r)^T`` for the decoded unit row ``q_r``
    (``H = None``: the squared error, weighted per entry by ``weights``); a row whose fit is not positive keeps
    its scale (the per-row codebook ``s_r C`` must stay sorted)."""
    w, q = np.asarray(w, np.float64), np.asarray(q, np.float64)
    if hessian is not None:
        qh = q @ hessian
    else:
        qh = q if weights is None else q * np.broadcast_to(weights, q.shape)
    num = np.einsum("ij,ij->i", qh, w)
    den = np.einsum("ij,ij->i", qh, q)
    ok = (den > 0) & (num > 0)
    return np.where(ok, num / np.where(ok, den, 1.0), scales)


def _solve(m: np.ndarray, b: np.ndarray, old: np.ndarray, keep_zero: bool) -> np.ndarray:
    """Solve ``m c = b`` for the free centroids (a fixed zero stays 0), lightly damped towards ``old``."""
    free = ~((old == 0) & keep_zero)
    out = np.array(old, dtype=np.float64)
    if not free.any():
        return out
    mf = m[np.ix_(free, free)]
    ridge = 1e-8 * max(float(np.mean(np.diag(mf))), 1e-30)
    try:
        out[free] = np.linalg.solve(mf + ridge * np.eye(mf.shape[0]), b[free] + ridge * old[free])
    except np.linalg.LinAlgError:
        pass
    return out


def output_error(w: np.ndarray, new: np.ndarray, hessian: np.ndarray) -> float:
    """Relative output error of the layer on the calibration inputs: ``tr(dW H dW^T) / tr(W H W^T)``."""
    w = np.asarray(w, np.float64)
    dw = np.asarray(new, np.float64) - w
    den = float(np.einsum("ij,jk,ik->", w, hessian, w, optimize=True))
    num = float(np.einsum("ij,jk,ik->", dw, hessian, dw, optimize=True))
    return num / den if den > 0 else 0.0
