"""Streaming reductions of calibration tensors: ``_Accumulator.update`` takes one sample's array, keeps nothing of
it, and ``result()`` gives the ``TensorStats`` (see ``calibration_stats``).

Streaming histogram: a uniform grid of ``bins`` bins, first fitted to the first sample. When a sample falls
outside the grid, the grid is re-fitted to cover it and the occupied old bins: the origin moves by a whole
number of old bins and the width is multiplied by a power of two, so every old bin lies inside exactly one
new bin and the old counts merge without any approximation. The final histogram thus equals binning all
values directly on the final grid. The approximation is in resolution only: the width is a power-of-two
multiple of the first sample's, so the grid can span up to ~2x the observed [min, max] (at least ~bins/2
bins cover the data). Non-finite values (NaN, +-inf) are left out of all statistics.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from .calibration_stats import ConvPatches, TensorStats, _uniform_edges
from .errors import BadInputError

__all__ = ["_Accumulator"]

_CHUNK = 1 << 20  # values binned at a time: bounds the temporaries of huge activations


class _Accumulator:
    """Running reductions of one tensor; ``update`` takes one sample's array and keeps nothing of it."""

    def __init__(
        self,
        name: str,
        channel_axis: int | None,
        stacked: int,
        bins: int | None,
        mean_axis: int | None = None,
        gram_axis: int | ConvPatches | None = None,
        norm_axis: int | None = None,
    ):
        self.name = name
        self.channel_axis = channel_axis
        self.mean_axis = mean_axis
        self.norm_axis = norm_axis
        self.csq: np.ndarray | None = None  # per-channel running sums of squares (norms=)
        self.csum: np.ndarray | None = None  # per-channel running sums / counts (means=)
        self.gram_axis = gram_axis
        self.gram: np.ndarray | None = None
        self.gram_rows = 0
        self.cnum: np.ndarray | None = None
        self.stacked = stacked  # leading dims added by Loop/Scan stacking; shift a non-negative channel axis
        self.bins = bins
        self.count = 0
        self.samples = 0
        self.min = math.inf
        self.max = -math.inf
        self.cmin: np.ndarray | None = None
        self.cmax: np.ndarray | None = None
        self.hist: np.ndarray | None = None
        self.lo = 0.0  # histogram grid origin
        self.width = 0.0  # histogram bin width

    def update(self, value: Any) -> None:
        arr = np.asarray(value)
        if arr.size == 0:  # the not-taken If branch's placeholder, or a genuinely empty tensor
            return
        if arr.dtype.kind not in "fiub":
            raise BadInputError(f"tensor '{self.name}' has dtype {arr.dtype}; only numeric tensors have ranges")
        if arr.dtype.kind != "f":
            arr = arr.astype(np.float64)
        finite = np.isfinite(arr)
        all_finite = bool(finite.all())
        flat = arr.reshape(-1) if all_finite else arr[finite]
        if flat.size == 0:
            return
        self.samples += 1
        self.count += int(flat.size)
        self.min = min(self.min, float(flat.min()))
        self.max = max(self.max, float(flat.max()))
        if self.channel_axis is not None:
            self._update_channels(arr, None if all_finite else finite)
        if self.mean_axis is not None:
            self._update_means(arr, None if all_finite else finite)
        if self.norm_axis is not None:
            self._update_norms(arr, None if all_finite else finite)
        if self.gram_axis is not None:
            self._update_gram(arr)
        if self.bins:
            self._update_hist(flat)

    def _reduce_axes(self, arr: np.ndarray, channel_axis: int, what: str) -> tuple[int, ...]:
        """Every axis but the channel one (shifted past a stacked Loop-iteration axis)."""
        axis = channel_axis + self.stacked if channel_axis >= 0 else channel_axis
        if not -arr.ndim <= axis < arr.ndim:
            raise BadInputError(
                f"{what} {channel_axis} is out of range for tensor '{self.name}' of shape "
                f"{list(arr.shape)}; give an axis in [-{arr.ndim}, {arr.ndim - 1}]"
            )
        axis %= arr.ndim
        return tuple(i for i in range(arr.ndim) if i != axis)

    def _update_channels(self, arr: np.ndarray, finite: np.ndarray | None) -> None:
        assert self.channel_axis is not None
        others = self._reduce_axes(arr, self.channel_axis, "per-channel axis")
        if finite is None:  # the common case: plain reductions, no copy
            cmin = arr.min(axis=others).astype(np.float64)
            cmax = arr.max(axis=others).astype(np.float64)
        else:  # a channel with no finite value gives NaN, which fmin/fmax below skip
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN channel
                cmin = np.nanmin(np.where(finite, arr, np.nan), axis=others).astype(np.float64)
                cmax = np.nanmax(np.where(finite, arr, np.nan), axis=others).astype(np.float64)
        if self.cmin is None:
            self.cmin, self.cmax = np.full_like(cmin, np.inf), np.full_like(cmax, -np.inf)
        elif self.cmin.shape != cmin.shape:
            raise BadInputError(
                f"tensor '{self.name}' has {cmin.shape[0]} channels on axis {self.channel_axis} in one sample "
                f"and {self.cmin.shape[0]} in another; per-channel stats need a fixed channel count"
            )
        self.cmin = np.fmin(self.cmin, cmin)
        self.cmax = np.fmax(self.cmax, cmax)

    def _update_norms(self, arr: np.ndarray, finite: np.ndarray | None) -> None:
        assert self.norm_axis is not None
        others = self._reduce_axes(arr, self.norm_axis, "norm axis")
        x = arr.astype(np.float64) if finite is None else np.where(finite, arr, 0).astype(np.float64)
        csq = np.square(x).sum(axis=others)
        if self.csq is None:
            self.csq = np.zeros_like(csq)
        elif self.csq.shape != csq.shape:
            raise BadInputError(
                f"tensor '{self.name}' has {csq.shape[0]} channels on axis {self.norm_axis} in one sample "
                f"and {self.csq.shape[0]} in another; per-channel norms need a fixed channel count"
            )
        self.csq += csq

    def _update_means(self, arr: np.ndarray, finite: np.ndarray | None) -> None:
        assert self.mean_axis is not None
        others = self._reduce_axes(arr, self.mean_axis, "mean axis")
        axis = next(i for i in range(arr.ndim) if i not in others)
        if finite is None:
            csum = arr.sum(axis=others, dtype=np.float64)
            cnum = np.full(csum.shape, arr.size // max(arr.shape[axis], 1), dtype=np.float64)
        else:
            csum = np.where(finite, arr, 0).sum(axis=others, dtype=np.float64)
            cnum = finite.sum(axis=others).astype(np.float64)
        if self.csum is None:
            self.csum, self.cnum = np.zeros_like(csum), np.zeros_like(cnum)
        elif self.csum.shape != csum.shape:
            raise BadInputError(
                f"tensor '{self.name}' has {csum.shape[0]} channels on axis {self.mean_axis} in one sample "
                f"and {self.csum.shape[0]} in another; per-channel means need a fixed channel count"
            )
        self.csum += csum
        self.cnum += cnum

    def _update_gram(self, arr: np.ndarray) -> None:
        assert self.gram_axis is not None
        if isinstance(self.gram_axis, ConvPatches):
            c, chunks = self.gram_axis.columns(arr, self.name), self.gram_axis.rows(arr, _CHUNK)
        else:
            others = self._reduce_axes(arr, self.gram_axis, "Gram axis")
            axis = next(i for i in range(arr.ndim) if i not in others)
            rows = np.moveaxis(arr, axis, -1).reshape(-1, arr.shape[axis])
            c = rows.shape[1]
            step = max(1, _CHUNK // max(c, 1))  # float64 temporaries of at most _CHUNK values
            chunks = (rows[start : start + step] for start in range(0, rows.shape[0], step))
        if self.gram is None:
            self.gram = np.zeros((c, c), dtype=np.float64)
        elif self.gram.shape[0] != c:
            raise BadInputError(
                f"tensor '{self.name}' has {c} Gram columns ({self.gram_axis}) in one sample and "
                f"{self.gram.shape[0]} in another; a Gram matrix needs a fixed channel count"
            )
        for chunk in chunks:
            x = chunk.astype(np.float64)
            keep = np.isfinite(x).all(axis=1)
            if not keep.all():
                x = x[keep]
            self.gram += x.T @ x
            self.gram_rows += int(x.shape[0])

    def _update_hist(self, flat: np.ndarray) -> None:
        bins = self.bins
        assert bins
        a, b = float(flat.min()), float(flat.max())
        if self.hist is None:
            span = b - a
            # A constant first sample still needs a non-zero width; later widening rescales it anyway.
            span = max(span, 1e-6 * max(abs(a), abs(b)), 1e-12)
            self.lo, self.width = a, span / bins
            self.hist = np.zeros(bins, dtype=np.int64)
        elif a < self.lo or b > self.lo + bins * self.width:
            self._widen(a, b)
        # Own binning in float64 chunks: np.histogram works in the data's dtype, which overflows or merges
        # edges for float32 data with huge ranges (e.g. -3.4e38 attention-mask fills).
        inv = 1.0 / self.width
        for start in range(0, flat.size, _CHUNK):
            idx = np.subtract(flat[start : start + _CHUNK], self.lo, dtype=np.float64)
            idx *= inv
            np.floor(idx, out=idx)
            np.clip(idx, 0, bins - 1, out=idx)  # float rounding at the two ends
            self.hist += np.bincount(idx.astype(np.intp), minlength=bins)

    def _widen(self, a: float, b: float) -> None:
        """Re-grid to cover [a, b] and the occupied old bins: origin moves by m old bins, width scales by 2**k.

        New edges then lie on the old grid, so each old bin falls inside one new bin: the merge is exact.
        """
        bins, w = self.bins, self.width
        assert bins and self.hist is not None
        occupied = np.flatnonzero(self.hist)
        i0, i1 = (int(occupied[0]), int(occupied[-1])) if occupied.size else (0, 0)
        lo_need = min(a, self.lo + i0 * w)
        hi_need = max(b, self.lo + (i1 + 1) * w)
        m = math.floor((lo_need - self.lo) / w)  # may be negative (origin moves down) or positive (up)
        while self.lo + m * w > lo_need:  # guard float rounding
            m -= 1
        lo = self.lo + m * w
        k = max(0, math.ceil(math.log2(max((hi_need - lo) / (bins * w), 1.0))))
        while lo + bins * w * 2.0**k < hi_need:
            k += 1
        # Old bin i covers [lo + (i-m) w, lo + (i-m+1) w]: it lies in new bin (i - m) >> k.
        idx = np.array([(i - m) >> k for i in occupied.tolist()], dtype=np.int64)
        merged = np.zeros(bins, dtype=np.int64)
        np.add.at(merged, np.clip(idx, 0, bins - 1), self.hist[occupied])
        self.hist, self.lo, self.width = merged, lo, w * 2.0**k

    def result(self) -> TensorStats:
        edges = None
        if self.hist is not None:
            edges = _uniform_edges(self.lo, self.width, self.bins)
        mean = None
        if self.csum is not None and self.cnum is not None:
            with np.errstate(invalid="ignore", divide="ignore"):  # a channel without finite values: NaN
                mean = np.where(self.cnum > 0, self.csum / np.maximum(self.cnum, 1), np.nan)
        return TensorStats(
            name=self.name,
            count=self.count,
            min=self.min,
            max=self.max,
            channel_axis=self.channel_axis,
            channel_min=self.cmin,
            channel_max=self.cmax,
            hist=None if self.hist is None else self.hist.copy(),
            hist_edges=edges,
            samples=self.samples,
            mean_axis=self.mean_axis if self.csum is not None else None,
            channel_mean=mean,
            gram_axis=self.gram_axis if self.gram is not None else None,
            gram=None if self.gram is None else self.gram.copy(),
            gram_rows=self.gram_rows,
            norm_axis=self.norm_axis if self.csq is not None else None,
            channel_norm=None if self.csq is None else np.sqrt(self.csq),
        )
