"""Running statistics of calibration tensors: what ``collect_statistics`` keeps of each sample.

Per tensor (float64 throughout): min/max, per-channel min/max, per-channel means (bias correction), the
second-moment (Gram) matrix ``sum x x^T`` over one feature axis (GPTQ weight rounding), and a streaming
histogram (percentile / entropy / mse ranges). All are fixed-size: memory does not grow with the samples.

Streaming histogram: a uniform grid of ``bins`` bins, first fitted to the first sample. When a sample falls
outside the grid, the grid is re-fitted to cover it and the occupied old bins: the origin moves by a whole
number of old bins and the width is multiplied by a power of two, so every old bin lies inside exactly one
new bin and the old counts merge without any approximation. The final histogram thus equals binning all
values directly on the final grid. The approximation is in resolution only: the width is a power-of-two
multiple of the first sample's, so the grid can span up to ~2x the observed [min, max] (at least ~bins/2
bins cover the data). Non-finite values (NaN, +-inf) are left out of all statistics.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import calibration_ranges as _ranges
from .errors import BadInputError, UsageError

__all__ = ["TensorStats", "Statistics", "ConvPatches", "RANGE_METHODS"]

RANGE_METHODS = _ranges.RANGE_METHODS
_FORMAT = "onnxslim.calibration.v1"
_CHUNK = 1 << 20  # values binned at a time: bounds the temporaries of huge activations


@dataclass(frozen=True)
class ConvPatches:
    """A Gram request over convolution patches: the rows are the input patches a Conv (group 1, channels on
    axis 1, 1-D or 2-D) multiplies its weight with, flattened in the weight's (C, k...) order, so the Gram
    matrix is ``E[p p^T]`` for the weight viewed as ``[M, C * prod(kernel)]``."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    pads: tuple[int, ...]  # ONNX order: begins then ends
    dilations: tuple[int, ...]

    @staticmethod
    def to_json(v: Any) -> Any:
        return (
            {"conv_patches": [list(v.kernel), list(v.strides), list(v.pads), list(v.dilations)]}
            if isinstance(v, ConvPatches)
            else v
        )

    @staticmethod
    def from_json(v: Any) -> Any:
        if isinstance(v, dict) and "conv_patches" in v:
            return ConvPatches(*(tuple(int(x) for x in part) for part in v["conv_patches"]))
        return v

    def columns(self, arr: np.ndarray, name: str) -> int:
        if arr.ndim != 2 + len(self.kernel):
            raise BadInputError(
                f"tensor '{name}' has shape {list(arr.shape)}; Conv patches of kernel "
                f"{list(self.kernel)} need [N, C, {len(self.kernel)} spatial dims]"
            )
        return int(arr.shape[1] * np.prod(self.kernel))

    def rows(self, arr: np.ndarray, chunk: int) -> Iterator[np.ndarray]:
        """Patch rows, a few output rows at a time (bounded temporaries)."""
        k = len(self.kernel)
        x = arr if k == 2 else arr[:, :, None, :]  # 1-D as 2-D with height 1
        kernel = self.kernel if k == 2 else (1, *self.kernel)
        strides = self.strides if k == 2 else (1, *self.strides)
        dil = self.dilations if k == 2 else (1, *self.dilations)
        pads = self.pads if k == 2 else (0, self.pads[0], 0, self.pads[1])
        x = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
        span = [(kernel[i] - 1) * dil[i] + 1 for i in range(2)]
        win = np.lib.stride_tricks.sliding_window_view(x, span, axis=(2, 3))
        win = win[:, :, :: strides[0], :: strides[1], :: dil[0], :: dil[1]]  # [N, C, OH, OW, kh, kw]
        n, c, oh, ow = win.shape[:4]
        per_row = max(1, n * ow * c * kernel[0] * kernel[1])
        step = max(1, chunk // per_row)
        for r in range(0, oh, step):
            part = win[:, :, r : r + step].transpose(0, 2, 3, 1, 4, 5)
            yield part.reshape(-1, c * kernel[0] * kernel[1])


@dataclass
class TensorStats:
    """Running statistics of one tensor over all calibration samples (float64 throughout)."""

    name: str
    count: int = 0  # number of (finite) values seen
    min: float = math.inf
    max: float = -math.inf
    channel_axis: int | None = None
    channel_min: np.ndarray | None = None
    channel_max: np.ndarray | None = None
    hist: np.ndarray | None = None  # int64 counts, len = bins
    hist_edges: np.ndarray | None = None  # float64, len = bins + 1, uniform
    samples: int = 0  # calibration samples in which the tensor had at least one value
    mean_axis: int | None = None  # set when per-channel means were asked for (``means=``)
    channel_mean: np.ndarray | None = None  # float64 mean of the finite values of each channel
    gram_axis: int | ConvPatches | None = None  # set when a Gram matrix was asked for (``grams=``)
    gram: np.ndarray | None = None  # float64 [C, C]: sum over rows of x x^T, x = the values along gram_axis
    gram_rows: int = 0  # rows (vectors along gram_axis without a non-finite value) summed into ``gram``
    norm_axis: int | None = None  # set when per-channel norms were asked for (``norms=``)
    channel_norm: np.ndarray | None = None  # float64 L2 norm of each channel's finite values (importance |x|)

    def holds(
        self,
        *,
        per_channel: int | None = None,
        mean: int | None = None,
        gram: int | ConvPatches | None = None,
        norm: int | None = None,
        histogram: bool = False,
    ) -> bool:
        """True when these statistics include what is asked: each axis given (None: not asked) and, when asked,
        a histogram (a tensor never seen needs none)."""
        return (
            (per_channel is None or self.channel_axis == per_channel)
            and (mean is None or self.mean_axis == mean)
            and (gram is None or self.gram_axis == gram)
            and (norm is None or self.norm_axis == norm)
            and not (histogram and self.count and self.hist is None)
        )

    def range(
        self,
        method: str = "minmax",
        *,
        percentile: float = 99.999,
        symmetric: bool = False,
        num_quantized_bins: int = 128,
    ) -> tuple[float, float]:
        """The clip range ``(lo, hi)`` chosen by ``method``; always within ``[min, max]``.

        - ``minmax``: the observed range.
        - ``percentile``: two-sided by default (cuts (100-p)/2 % of the values on each side, as onnxruntime);
          ``symmetric=True`` takes the p-th percentile of |x| as threshold t and returns [-t, t] ∩ [min, max].
        - ``entropy``: TensorRT's KL-divergence threshold on the |x| histogram (``num_quantized_bins`` levels),
          returned as [-t, t] ∩ [min, max].
        - ``mse``: the range minimizing the expected int8 (256-level) quantization MSE on the histogram,
          searched over ranges [f*min, f*max] (the zero point stays where minmax would put it).
        """
        if self.count == 0:
            raise BadInputError(
                f"no values were seen for tensor '{self.name}' (calibration data never ran the subgraph "
                "branch that computes it, or it is always empty); give data that exercises it"
            )
        how = RANGE_METHODS.get(method)
        if how is None:
            raise UsageError(f"unknown range method '{method}'; use one of {', '.join(RANGE_METHODS)}")
        if how.select is None:
            return float(self.min), float(self.max)
        if self.hist is None or self.hist_edges is None:
            raise UsageError(
                f"range method '{method}' needs histograms, but tensor '{self.name}' was collected with "
                "histograms=False; collect again with histograms=True"
            )
        given = {"percentile": percentile, "symmetric": symmetric, "num_quantized_bins": num_quantized_bins}
        lo, hi = how.select(
            self.hist, self.hist_edges, float(self.min), float(self.max), **{k: given[k] for k in how.options}
        )
        # Guard the contract against float noise in the searches.
        lo = min(max(float(lo), float(self.min)), float(self.max))
        hi = min(max(float(hi), lo), float(self.max))
        return lo, hi

    # -- serialization -------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        def arr(a: np.ndarray | None) -> list | None:
            return None if a is None else a.tolist()

        return {
            "name": self.name,
            "count": int(self.count),
            "samples": int(self.samples),
            "min": None if self.count == 0 else float(self.min),
            "max": None if self.count == 0 else float(self.max),
            "channel_axis": self.channel_axis,
            "channel_min": arr(self.channel_min),
            "channel_max": arr(self.channel_max),
            "hist": arr(self.hist),
            **_edges_to_json(self.hist_edges),
            "mean_axis": self.mean_axis,
            "channel_mean": arr(self.channel_mean),
            "gram_axis": ConvPatches.to_json(self.gram_axis),
            "gram": arr(self.gram),
            "gram_rows": int(self.gram_rows),
            "norm_axis": self.norm_axis,
            "channel_norm": arr(self.channel_norm),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TensorStats:
        def arr(v: Any, dtype: Any) -> np.ndarray | None:
            return None if v is None else np.asarray(v, dtype=dtype)

        return cls(
            name=d["name"],
            count=int(d["count"]),
            samples=int(d.get("samples", 0)),
            min=math.inf if d["min"] is None else float(d["min"]),
            max=-math.inf if d["max"] is None else float(d["max"]),
            channel_axis=d.get("channel_axis"),
            channel_min=arr(d.get("channel_min"), np.float64),
            channel_max=arr(d.get("channel_max"), np.float64),
            hist=arr(d.get("hist"), np.int64),
            hist_edges=_edges_from_json(d),
            mean_axis=d.get("mean_axis"),
            channel_mean=arr(d.get("channel_mean"), np.float64),
            gram_axis=ConvPatches.from_json(d.get("gram_axis")),
            gram=arr(d.get("gram"), np.float64),
            gram_rows=int(d.get("gram_rows", 0)),
            norm_axis=d.get("norm_axis"),
            channel_norm=arr(d.get("channel_norm"), np.float64),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TensorStats):
            return NotImplemented
        return json.dumps(self.to_dict(), sort_keys=True) == json.dumps(other.to_dict(), sort_keys=True)


def _uniform_edges(lo: float, width: float, bins: int) -> np.ndarray:
    return lo + np.arange(bins + 1, dtype=np.float64) * width


def _edges_to_json(edges: np.ndarray | None) -> dict:
    """Uniform edges as (lo, width, bins) when that rebuilds them bit for bit (halves the file), else listed."""
    if edges is None:
        return {"hist_edges": None}
    lo, width = float(edges[0]), float(edges[1] - edges[0]) if len(edges) > 1 else 0.0
    if len(edges) > 1 and np.array_equal(_uniform_edges(lo, width, len(edges) - 1), edges):
        return {"hist_grid": [lo, width, len(edges) - 1]}
    return {"hist_edges": edges.tolist()}


def _edges_from_json(d: Mapping[str, Any]) -> np.ndarray | None:
    if d.get("hist_grid") is not None:
        lo, width, bins = d["hist_grid"]
        return _uniform_edges(float(lo), float(width), int(bins))
    return None if d.get("hist_edges") is None else np.asarray(d["hist_edges"], dtype=np.float64)


class Statistics(Mapping[str, TensorStats]):
    """Tensor name -> ``TensorStats``, plus ``meta`` (samples seen, bins, data description).

    ``save``/``load`` write JSON; floats are written with ``repr`` precision so a round trip is exact.
    """

    def __init__(
        self,
        stats: Mapping[str, TensorStats] | None = None,
        meta: Mapping[str, Any] | None = None,
        values: Mapping[str, list[np.ndarray]] | None = None,
    ):
        self._stats: dict[str, TensorStats] = dict(stats or {})
        self.meta: dict[str, Any] = dict(meta or {})
        # Kept values of chosen tensors, sample by sample (``keep=``: a teacher's intermediate outputs for
        # reconstruction); never written by ``save``.
        self.values: dict[str, list[np.ndarray]] = {k: list(v) for k, v in (values or {}).items()}

    def __getitem__(self, name: str) -> TensorStats:
        return self._stats[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._stats)

    def __len__(self) -> int:
        return len(self._stats)

    def __repr__(self) -> str:
        return f"Statistics({len(self)} tensors, {self.meta.get('samples', '?')} samples)"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Statistics):
            return NotImplemented
        return self.meta == other.meta and dict(self._stats) == dict(other._stats)

    def to_dict(self) -> dict:
        return {"format": _FORMAT, "meta": self.meta, "tensors": [s.to_dict() for s in self._stats.values()]}

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        # Infinity can appear only in per-channel arrays (a channel that never saw a finite value).
        tmp.write_text(json.dumps(self.to_dict()))
        os.replace(tmp, path)  # atomic: a crashed run never leaves a half-written cache

    @classmethod
    def load(cls, path: str | os.PathLike) -> Statistics:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise BadInputError(f"cannot read calibration statistics {path} ({e}); collect them again") from e
        if not isinstance(d, dict) or d.get("format") != _FORMAT:
            raise BadInputError(f"{path} is not an onnxslim statistics file (format {_FORMAT}); collect again")
        return cls({t["name"]: TensorStats.from_dict(t) for t in d["tensors"]}, d.get("meta"))


# -- streaming accumulation ------------------------------------------------------------------------------


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
