"""Private helper of distill_layers: the closed-form refits of one layer and the choice between them.

The layer's parameters are ``theta = [W^T; b]`` (``[K + 1, M]``), its error against the teacher on the rows of
``Moments`` m is ``E(theta) = sum_m theta_m^T a theta_m - 2 g_m^T theta_m + yy_m`` (float64). Refits:

- ``fit_free`` (float weights): per output channel, least squares over its free entries only (the surviving
  inputs of a pruned row, and the bias when the layer has one); the others keep their value (zeros stay zero).
  Rows with the same free pattern share one solve. Ridge towards the current values,
  ``(a_SS + lam I) theta_S = g_S - a_SF theta_F + lam theta0_S`` with ``lam = damping * mean(diag a_xx)``: where
  the data says nothing (a dead input), the weight stays as compression left it instead of shrinking to 0.
- ``fit_codebook``: ``W = sum_k c_k [codes == k]`` with the codes fixed; the normal equations in the centroids are
  ``A_kl = tr(M_k^T a M_l)``, ``g_k = tr(M_k^T g)``, built by summing ``a``'s rows and columns per code. One shared
  codebook: the per-output biases are eliminated first (Schur complement). Exact zero centroids (pruned, then
  shared) stay zero; unused centroids stay as they are. With channel scales (``W_m = s_m C[codes_m]``) output m's
  terms are scaled by ``s_m`` (``s_m^2`` in ``A``); the scales stay.
- ``fit_int8`` (int8 weights, scales kept): the float least squares above, then its weights rounded onto the
  int8 grid by GPTQ with the student's own input Gram ``a_xx`` (minimizing ``||(W_q - W*) x_s||``, which is the
  teacher-matched error up to a constant), then the bias solved again for the rounded weights.
- bias only: ``b += mean(y_t - y_s)`` per channel, from the measured differences (int8 layers, grouped Convs).

``choose`` fits each candidate on one fold of samples and measures it on the other (both ways), and keeps the
one with the lowest held-out error, if that beats the student as it is; then refits it on all the samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxslim.obs import gptq_round

from ._moments import Moments

__all__ = ["Choice", "choose", "fit_free", "fit_codebook", "fit_int8", "quad_error"]

_GAIN = 1e-3  # a refit must lower the held-out error by this fraction to be kept (noise is no gain)


@dataclass
class Choice:
    refit: str  # weights | bias | none
    before: float  # relative error on all calibration rows, the student as it is
    after: float
    theta: np.ndarray | None = None  # weights: the new [K + 1, M]
    centroids: np.ndarray | None = None  # codebook: the new effective centroids [R, Kc]
    shift: np.ndarray | None = None  # bias: added to the effective bias
    held_out: float | None = None  # relative held-out error of the chosen refit
    reason: str = ""


def quad_error(theta: np.ndarray, m: Moments) -> float:
    e = np.einsum("km,km->m", m.a @ theta, theta) - 2 * np.einsum("km,km->m", m.g, theta) + m.yy
    return float(np.maximum(e, 0.0).sum())


def _bias_error(shift: np.ndarray, m: Moments) -> float:
    return float(np.maximum(m.dsq - 2 * shift * m.dsum + m.rows * shift**2, 0.0).sum())


def fit_free(m: Moments, theta0: np.ndarray, free: np.ndarray, damping: float) -> np.ndarray:
    a, g = m.a, m.g
    k = a.shape[0] - 1
    lam = damping * float(np.mean(np.diag(a)[:k])) if k else 0.0
    lam = lam if lam > 0 else damping * max(float(a[k, k]), 1.0)
    theta = theta0.copy()
    groups: dict[bytes, list[int]] = {}
    for col in range(free.shape[1]):
        groups.setdefault(np.packbits(free[:, col]).tobytes(), []).append(col)
    for cols in groups.values():
        s = free[:, cols[0]]
        if not s.any():
            continue
        f = ~s
        q = a[np.ix_(s, s)] + lam * np.eye(int(s.sum()))
        r = g[np.ix_(s, cols)] - a[np.ix_(s, f)] @ theta0[np.ix_(f, cols)] + lam * theta0[np.ix_(s, cols)]
        theta[np.ix_(s, cols)] = _solve(q, r, theta0[np.ix_(s, cols)])
    return theta


def fit_int8(
    m: Moments, theta0: np.ndarray, free: np.ndarray, row_scale: np.ndarray, qmax: int, damping: float, has_bias: bool
) -> np.ndarray:
    """theta with its weights on the int8 grid ``row_scale`` x integers in [-qmax, qmax] (see the docstring)."""
    k = m.a.shape[0] - 1
    theta = fit_free(m, theta0, free, damping)
    q = gptq_round(theta[:k].T, row_scale, m.a[:k, :k], qmax, damping)
    out = theta.copy()
    out[:k] = (q * row_scale[:, None]).T
    out[k] = (m.g[k] - out[:k].T @ m.a[:k, k]) / max(float(m.a[k, k]), 1.0) if has_bias else 0.0
    return out


def _solve(q: np.ndarray, r: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    try:
        out = np.linalg.solve(q, r)
    except np.linalg.LinAlgError:
        return fallback
    return out if np.isfinite(out).all() else fallback


def _per_code(a_rows: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes used, ``a_rows`` summed per code over rows, and that summed per code over columns too)."""
    order = np.argsort(codes, kind="stable")
    used, starts = np.unique(codes[order], return_index=True)
    eh = np.add.reduceat(a_rows[order], starts, axis=0)  # [p, K + 1]
    return used, eh, np.add.reduceat(eh[:, order], starts, axis=1)  # [p, p]


def fit_codebook(
    m: Moments,
    theta0: np.ndarray,
    codes: np.ndarray,
    book: np.ndarray,
    has_bias: bool,
    damping: float,
    scales: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(theta, new effective centroids [R, Kc]) for fixed ``codes`` [M, K] into ``book`` [R, Kc]; ``scales`` [M]
    (one codebook): row m is ``scales[m] * book[0][codes[m]]``."""
    a, g = m.a, m.g
    k, outs = codes.shape[1], codes.shape[0]
    rows = float(a[k, k])
    new = np.array(book, dtype=np.float64)
    bias = theta0[k].copy()
    lam_b = damping * max(rows, 1.0)
    shared = book.shape[0] == 1
    kc = book.shape[1]
    qcc, qcb, rc = np.zeros((kc, kc)), np.zeros((kc, outs)), np.zeros(kc)
    for o in range(outs):
        used, eh, q = _per_code(a[:k], codes[o])
        r = np.zeros(len(used))
        np.add.at(r, np.searchsorted(used, codes[o]), g[:k, o])
        if shared:
            sc = 1.0 if scales is None else float(scales[o])
            qcc[np.ix_(used, used)] += sc * sc * q
            qcb[used, o] = sc * eh[:, k]
            rc[used] += sc * r
            continue
        free = book[o, used] != 0  # an exact zero centroid stays zero (pruned entries)
        idx = used[free]
        if not len(idx):
            continue
        lam = damping * float(np.mean(np.diag(q)[free]))
        sys = q[np.ix_(free, free)] + lam * np.eye(len(idx))
        rhs = r[free] + lam * book[o, idx]
        if has_bias:
            sys = np.block([[sys, eh[free, k][:, None]], [eh[free, k][None, :], np.array([[rows + lam_b]])]])
            rhs = np.append(rhs, g[k, o] + lam_b * theta0[k, o])
        sol = _solve(sys, rhs, np.append(book[o, idx], theta0[k, o])[: len(rhs)])
        new[o, idx] = sol[: len(idx)]
        if has_bias:
            bias[o] = sol[-1]
    if shared:
        idx = np.nonzero((np.diag(qcc) > 0) & (book[0] != 0))[0]
        if len(idx):
            lam = damping * float(np.mean(np.diag(qcc)[idx]))
            sys = qcc[np.ix_(idx, idx)] + lam * np.eye(len(idx))
            rhs = rc[idx] + lam * book[0, idx]
            if has_bias:  # b_o = (g_ko + lam_b b0_o - qcb_o . c) / (rows + lam_b), eliminated
                cb = qcb[idx]
                sys = sys - cb @ cb.T / (rows + lam_b)
                rhs = rhs - cb @ (g[k] + lam_b * theta0[k]) / (rows + lam_b)
            new[0, idx] = _solve(sys, rhs, book[0, idx])
        if has_bias:
            bias = (g[k] + lam_b * theta0[k] - qcb.T @ new[0]) / (rows + lam_b)
    w = np.take_along_axis(new, codes, axis=1) if not shared else new[0][codes]
    if shared and scales is not None:
        w = w * np.asarray(scales, np.float64)[:, None]
    return np.vstack([w.T, bias[None, :]]), new


def choose(
    folds: tuple[Moments, Moments],
    theta0: np.ndarray | None,
    candidates: list[str],
    fit,
    allow_bias: bool,
) -> Choice:
    """The refit to keep. ``candidates``: "weights" and/or "bias"; ``fit(moments) -> (theta, centroids)`` refits
    the weights (with the bias, where the layer has one) on some rows."""
    total = folds[0] + folds[1]
    energy = float(total.yy.sum())
    before_abs = float(total.dsq.sum())
    before = before_abs / energy if energy > 0 else 0.0
    if energy <= 0 or total.rows == 0:
        return Choice("none", before, before, reason="the teacher's output is zero on the calibration data")
    if before < 1e-12:
        return Choice("none", before, before, reason="already matches the teacher")
    both = folds[0].rows > 0 and folds[1].rows > 0
    pairs = [(folds[0], folds[1]), (folds[1], folds[0])] if both else [(total, total)]
    scored: dict[str, float] = {}
    if "bias" in candidates and allow_bias:
        scored["bias"] = sum(_bias_error(f.dsum / max(f.rows, 1), v) for f, v in pairs)
    if "weights" in candidates and theta0 is not None:
        scored["weights"] = sum(quad_error(fit(f)[0], v) for f, v in pairs)
    if not scored:
        return Choice("none", before, before, reason="nothing to refit (no bias, weights not refit)")
    best = min(scored, key=lambda c: (scored[c], c))
    if scored[best] >= before_abs * (1 - _GAIN):
        return Choice(
            "none", before, before, held_out=min(scored.values()) / energy, reason="a refit does not lower the error"
        )
    if best == "bias":
        shift = total.dsum / total.rows
        return Choice("bias", before, _bias_error(shift, total) / energy, shift=shift, held_out=scored[best] / energy)
    theta, centroids = fit(total)
    return Choice(
        "weights", before, quad_error(theta, total) / energy, theta, centroids, held_out=scored[best] / energy
    )
