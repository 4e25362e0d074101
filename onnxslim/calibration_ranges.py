"""Clip-range selection on a streaming histogram: percentile, entropy (KL, as TensorRT), mse.

Every function takes ``(hist, edges, vmin, vmax)`` (uniform bins, counts of finite values, the exact
observed min/max) and returns a range inside ``[vmin, vmax]``. Within a bin, values are taken as spread
uniformly (the CDF is interpolated linearly between edges).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = ["percentile_range", "entropy_range", "mse_range", "RangeMethod", "RANGE_METHODS"]

_INT8_LEVELS = 256


def _cdf(hist: np.ndarray, edges: np.ndarray):
    """F(x): number of values below x, linear inside bins (vectorized)."""
    cum = np.concatenate([[0.0], np.cumsum(hist, dtype=np.float64)])
    return lambda x: np.interp(x, edges, cum)


def _first_reaching(f, target: float, lo: float, hi: float, iters: int = 100) -> float:
    """Smallest x in [lo, hi] with non-decreasing f(x) >= target (bisection)."""
    if f(lo) >= target:
        return lo
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if f(mid) >= target:
            hi = mid
        else:
            lo = mid
    return hi


def percentile_range(
    hist: np.ndarray,
    edges: np.ndarray,
    vmin: float,
    vmax: float,
    *,
    percentile: float = 99.999,
    symmetric: bool = False,
) -> tuple[float, float]:
    """Two-sided: cut (100-p)/2 % of the values on each side (onnxruntime's convention).

    Symmetric: t = the p-th percentile of |x|; returns [-t, t] clipped to [vmin, vmax].
    """
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile={percentile}; give a value in (0, 100]")
    total = float(hist.sum())
    if total == 0:
        return vmin, vmax
    F = _cdf(hist, edges)
    if symmetric:
        amax = max(abs(vmin), abs(vmax))
        t = _first_reaching(lambda t: F(t) - F(-t), percentile / 100.0 * total, 0.0, amax)
        return max(-t, vmin), min(t, vmax)
    cut = (100.0 - percentile) / 200.0 * total
    lo = _first_reaching(F, cut, vmin, vmax)
    hi = _first_reaching(F, total - cut, lo, vmax)
    return lo, hi


def _abs_hist(hist: np.ndarray, edges: np.ndarray, vmin: float, vmax: float, bins: int) -> tuple[np.ndarray, float]:
    """The |x| histogram on ``bins`` uniform bins over [0, max|x|] (mass split linearly), and its bin width."""
    amax = max(abs(vmin), abs(vmax))
    F = _cdf(hist, edges)
    u = np.linspace(0.0, amax, bins + 1)
    pos = np.diff(F(u))
    neg = -np.diff(F(-u))
    return np.maximum(pos + neg, 0.0), amax / bins


def entropy_range(
    hist: np.ndarray, edges: np.ndarray, vmin: float, vmax: float, *, num_quantized_bins: int = 128
) -> tuple[float, float]:
    """TensorRT's entropy calibration on the |x| histogram: the threshold whose ``num_quantized_bins``-level
    quantization keeps the distribution closest in KL divergence; returns [-t, t] clipped to [vmin, vmax].

    Candidate thresholds are the bin edges from ``num_quantized_bins`` up, strided so that at most ~512 are
    tried (with 2048 bins: every 4th edge, a 0.2% grid of the range) to bound the cost per tensor.
    """
    nbins = len(hist)
    nq = num_quantized_bins
    if nq < 2 or nbins < nq:
        raise ValueError(f"num_quantized_bins={nq} must be in [2, bins={nbins}]")
    h, width = _abs_hist(hist, edges, vmin, vmax, nbins)
    if width == 0 or h.sum() == 0:
        return vmin, vmax
    suffix = np.concatenate([np.cumsum(h[::-1])[::-1], [0.0]])  # suffix[i] = mass at or beyond bin i
    stride = max(1, -(-(nbins - nq) // 512))
    candidates = list(range(nq, nbins + 1, stride))
    if candidates[-1] != nbins:
        candidates.append(nbins)
    best_i, best_kl = nbins, np.inf
    for i in candidates:
        p = h[:i].copy()
        p[-1] += suffix[i]  # outliers are clipped into the last bin
        nonzero = h[:i] > 0
        # Merge the first i bins into nq groups (the last group takes the remainder), then expand each
        # group's mass evenly over its non-empty bins.
        group = np.minimum(np.arange(i) * nq // i, nq - 1)
        qmass = np.bincount(group, weights=h[:i], minlength=nq)
        qcount = np.bincount(group, weights=nonzero, minlength=nq)
        q = np.where(nonzero, qmass[group] / np.maximum(qcount[group], 1), 0.0)
        ps, qs = p.sum(), q.sum()
        if ps == 0 or qs == 0:
            continue
        p /= ps
        q /= qs
        mask = p > 0
        kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
        if kl < best_kl:
            best_kl, best_i = kl, i
    t = best_i * width
    return max(-t, vmin), min(t, vmax)


def mse_range(hist: np.ndarray, edges: np.ndarray, vmin: float, vmax: float) -> tuple[float, float]:
    """The range [f*lo0, f*hi0] (lo0 = min(vmin, 0), hi0 = max(vmax, 0), 0 < f <= 1) minimizing the expected
    squared error of 256-level uniform quantization: values inside get rounding noise step^2/12, values
    outside are clipped to the nearest end (bin centers stand for their values). ``f`` is searched on a
    log grid over [1e-4, 1] and then refined linearly around the best point.
    """
    lo0, hi0 = min(vmin, 0.0), max(vmax, 0.0)
    if hi0 - lo0 <= 0 or hist.sum() == 0:
        return vmin, vmax
    centers = 0.5 * (edges[:-1] + edges[1:])
    keep = hist > 0
    c, n = centers[keep], hist[keep].astype(np.float64)

    def errors(fs: np.ndarray) -> np.ndarray:
        a, b = fs[:, None] * lo0, fs[:, None] * hi0
        step = (b - a) / (_INT8_LEVELS - 1)
        over = np.maximum(c[None, :] - b, 0.0)
        under = np.maximum(a - c[None, :], 0.0)
        inside = (over == 0) & (under == 0)
        return (n * (over**2 + under**2 + inside * step**2 / 12.0)).sum(axis=1)

    fs = np.geomspace(1e-4, 1.0, 400)
    k = int(np.argmin(errors(fs)))
    fine = np.linspace(fs[max(k - 1, 0)], fs[min(k + 1, len(fs) - 1)], 101)
    errs = errors(fine)
    f = float(fine[int(np.argmin(errs))])
    if errors(np.array([1.0]))[0] <= errs.min():
        f = 1.0
    return max(f * lo0, vmin), min(f * hi0, vmax)


@dataclass(frozen=True)
class RangeMethod:
    """A way to pick an activation's clip range: ``select(hist, edges, vmin, vmax, **options)``, or None for the
    observed [min, max] (no histogram needed); ``options`` names the keyword options ``select`` takes."""

    select: Callable[..., tuple[float, float]] | None
    options: tuple[str, ...] = ()

    @property
    def needs_histogram(self) -> bool:
        return self.select is not None


# Every range method, by name: adding one is one entry here (the quantizer's range_method choices, the
# calibration service's histogram requests and ``TensorStats.range`` all read this table).
RANGE_METHODS: dict[str, RangeMethod] = {
    "minmax": RangeMethod(None),
    "percentile": RangeMethod(percentile_range, ("percentile", "symmetric")),
    "entropy": RangeMethod(entropy_range, ("num_quantized_bins",)),
    "mse": RangeMethod(mse_range),
}
