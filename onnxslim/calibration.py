"""Activation statistics for calibration: one streaming pass over the data, in bounded memory.

``collect_statistics`` builds ONE copy of the model whose graph outputs also expose the requested tensors
(tensors inside If/Loop/Scan bodies are routed out through extra subgraph outputs, see ``calibration_graph``),
runs it sample by sample in onnxruntime with graph optimizations DISABLED (so every name still exists),
reduces each sample's activations into running statistics and drops them. Peak memory is one sample's
requested activations plus fixed-size state per tensor (min/max, per-channel min/max, a ``bins``-bin
histogram); it does not grow with the number of samples. Samples may differ in shape. If stacking a Loop
tensor over iterations fails (its shape changes from one iteration to the next), the model is instrumented
once more with flattened loop-carried values and the same sample is rerun (nothing was counted from it).

Streaming histogram: a uniform grid of ``bins`` bins, first fitted to the first sample. When a sample falls
outside the grid, the grid is re-fitted to cover it and the occupied old bins: the origin moves by a whole
number of old bins and the width is multiplied by a power of two, so every old bin lies inside exactly one
new bin and the old counts merge without any approximation. The final histogram thus equals binning all
values directly on the final grid. The approximation is in resolution only: the width is a power-of-two
multiple of the first sample's, so the grid can span up to ~2x the observed [min, max] (at least ~bins/2
bins cover the data). Non-finite values (NaN, +-inf) are left out of all statistics.

Range selection on the histogram (percentile, entropy/KL, mse) lives in ``calibration_ranges``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import onnx

from . import calibration_ranges as _ranges
from .calibration_graph import expose_tensors
from .data import FeedData, load_feeds
from .errors import BadInputError, UsageError

__all__ = ["TensorStats", "Statistics", "collect_statistics", "RANGE_METHODS"]

log = logging.getLogger(__name__)

RANGE_METHODS = ("minmax", "percentile", "entropy", "mse")
_FORMAT = "onnxslim.calibration.v1"
_CHUNK = 1 << 20  # values binned at a time: bounds the temporaries of huge activations


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

    def range(self, method: str = "minmax", *, percentile: float = 99.999,
              symmetric: bool = False, num_quantized_bins: int = 128) -> tuple[float, float]:
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
        if method == "minmax":
            return float(self.min), float(self.max)
        if method not in RANGE_METHODS:
            raise UsageError(f"unknown range method '{method}'; use one of {', '.join(RANGE_METHODS)}")
        if self.hist is None or self.hist_edges is None:
            raise UsageError(
                f"range method '{method}' needs histograms, but tensor '{self.name}' was collected with "
                "histograms=False; collect again with histograms=True"
            )
        args = (self.hist, self.hist_edges, float(self.min), float(self.max))
        if method == "percentile":
            lo, hi = _ranges.percentile_range(*args, percentile=percentile, symmetric=symmetric)
        elif method == "entropy":
            lo, hi = _ranges.entropy_range(*args, num_quantized_bins=num_quantized_bins)
        else:
            lo, hi = _ranges.mse_range(*args)
        # Guard the contract against float noise in the searches.
        lo = min(max(float(lo), float(self.min)), float(self.max))
        hi = min(max(float(hi), lo), float(self.max))
        return lo, hi

    # -- serialization -------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        def arr(a: np.ndarray | None) -> list | None:
            return None if a is None else a.tolist()

        return {
            "name": self.name, "count": int(self.count), "samples": int(self.samples),
            "min": None if self.count == 0 else float(self.min),
            "max": None if self.count == 0 else float(self.max),
            "channel_axis": self.channel_axis,
            "channel_min": arr(self.channel_min), "channel_max": arr(self.channel_max),
            "hist": arr(self.hist), **_edges_to_json(self.hist_edges),
            "mean_axis": self.mean_axis, "channel_mean": arr(self.channel_mean),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TensorStats":
        def arr(v: Any, dtype: Any) -> np.ndarray | None:
            return None if v is None else np.asarray(v, dtype=dtype)

        return cls(
            name=d["name"], count=int(d["count"]), samples=int(d.get("samples", 0)),
            min=math.inf if d["min"] is None else float(d["min"]),
            max=-math.inf if d["max"] is None else float(d["max"]),
            channel_axis=d.get("channel_axis"),
            channel_min=arr(d.get("channel_min"), np.float64), channel_max=arr(d.get("channel_max"), np.float64),
            hist=arr(d.get("hist"), np.int64), hist_edges=_edges_from_json(d),
            mean_axis=d.get("mean_axis"), channel_mean=arr(d.get("channel_mean"), np.float64),
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

    def __init__(self, stats: Mapping[str, TensorStats] | None = None, meta: Mapping[str, Any] | None = None):
        self._stats: dict[str, TensorStats] = dict(stats or {})
        self.meta: dict[str, Any] = dict(meta or {})

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
    def load(cls, path: str | os.PathLike) -> "Statistics":
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

    def __init__(self, name: str, channel_axis: int | None, stacked: int, bins: int | None,
                 mean_axis: int | None = None):
        self.name = name
        self.channel_axis = channel_axis
        self.mean_axis = mean_axis
        self.csum: np.ndarray | None = None  # per-channel running sums / counts (means=)
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
            idx = np.subtract(flat[start:start + _CHUNK], self.lo, dtype=np.float64)
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
            name=self.name, count=self.count, min=self.min, max=self.max, channel_axis=self.channel_axis,
            channel_min=self.cmin, channel_max=self.cmax,
            hist=None if self.hist is None else self.hist.copy(), hist_edges=edges, samples=self.samples,
            mean_axis=self.mean_axis if self.csum is not None else None, channel_mean=mean,
        )


# -- the collection loop ---------------------------------------------------------------------------------


def collect_statistics(
    model: onnx.ModelProto | str | Path,
    data: FeedData | Any,
    tensors: Iterable[str],
    *,
    per_channel: Mapping[str, int] | None = None,
    means: Mapping[str, int] | None = None,
    histograms: bool = True,
    bins: int = 2048,
    max_samples: int | None = None,
    progress: Callable[[int, int | None], None] | None = None,
    base_dir: Path | None = None,
    cache: str | os.PathLike | None = None,
) -> Statistics:
    """Statistics of ``tensors`` (main graph or If/Loop/Scan bodies) over ``data``, in one streaming pass.

    ``data``: anything ``onnxslim.data.load_feeds`` accepts (one-shot iterators and ``get_next()`` readers
    are streamed, never held in memory). ``per_channel``: tensor name -> channel axis, of the tensor as its
    own (sub)graph sees it. ``means``: tensor name -> channel axis whose per-channel mean is wanted
    (``TensorStats.channel_mean``; bias correction uses it). ``progress(done, total)`` is called after
    each sample (``total`` is None when
    the source does not know its length). ``cache``: a JSON file; when it holds statistics collected with
    the same model, data description, tensors (or more), per-channel axes, bins and max_samples, they are
    returned without running anything; otherwise they are collected and written there. The data itself is
    identified by its description only (path and file count): delete the cache after changing the files.
    """
    proto = _load_model(model, base_dir)
    names = list(dict.fromkeys(tensors))
    per_channel = dict(per_channel or {})
    unknown = sorted(set(per_channel) - set(names))
    if unknown:
        raise UsageError(f"per_channel names tensor(s) not requested: {', '.join(unknown)}; add them to tensors")
    means = dict(means or {})
    unknown = sorted(set(means) - set(names))
    if unknown:
        raise UsageError(f"means names tensor(s) not requested: {', '.join(unknown)}; add them to tensors")
    if bins < 8 and histograms:
        raise UsageError(f"bins={bins} is too few for range selection; use at least 8 (default 2048)")
    if max_samples is not None and max_samples < 1:
        raise UsageError(f"max_samples={max_samples}; give a positive number or None")

    feeds = _stream(data).bind(proto)
    request = {"model_sha256": _fingerprint(proto), "data": feeds.description, "bins": bins if histograms else None,
               "max_samples": max_samples}
    if cache is not None:
        hit = _from_cache(Path(cache), request, names, per_channel, means)
        if hit is not None:
            return hit

    with contextlib.ExitStack() as stack:  # temporary external-data files live as long as their session
        runner = _Runner(proto, names, per_channel, stack)
        stats = _run(runner, feeds, names, per_channel, bins if histograms else None, max_samples, progress,
                     means)
    stats.meta.update(request)
    if cache is not None:
        stats.save(cache)
    return stats


class _Runner:
    """The instrumented session; re-instrumented once with flattened Loop outputs if stacking them fails."""

    def __init__(self, proto: onnx.ModelProto, names: list[str], per_channel: dict[str, int],
                 stack: contextlib.ExitStack):
        self.proto, self.names, self.per_channel, self.stack = proto, names, per_channel, stack
        self.flattened = False
        self._build(flatten_loops=False)

    def _build(self, flatten_loops: bool) -> None:
        from .runtime import make_session

        instrumented, self.routes = expose_tensors(self.proto, self.names, flatten_loops=flatten_loops)
        src = self.stack.enter_context(_session_source(instrumented))
        self.session = make_session(src, "cpu", optimize=False).session
        self.outputs = list(dict.fromkeys(r.output for r in self.routes.values()))
        import onnxruntime as ort

        # Failures come back as exceptions (and may be expected, see run): keep ORT's own logger quiet.
        self.run_options = ort.RunOptions()
        self.run_options.log_severity_level = 4

    def run(self, sample: Any) -> list[tuple[str, Any]]:
        try:
            return list(zip(self.outputs, self.session.run(self.outputs, sample.feeds, self.run_options)))
        except Exception as e:
            first = e
        # Scan outputs need one shape in every iteration; Loops whose shapes vary need flattened carries.
        loop_routes = [n for n, r in self.routes.items() if r.stacked]
        if self.flattened or not loop_routes:
            raise BadInputError(
                f"{sample.origin}: onnxruntime failed on this sample: {str(first).splitlines()[0]}") from first
        log.info("stacking loop outputs failed (%s); carrying them flattened instead", str(first).splitlines()[0])
        self.flattened = True
        self._build(flatten_loops=True)
        lost = sorted(n for n in self.per_channel if self.routes[n].flattened)
        if lost:
            raise BadInputError(
                f"tensor(s) {', '.join(lost)} change shape across Loop iterations ({str(first).splitlines()[0]}), "
                "so per-channel stats cannot be collected for them; drop them from per_channel"
            )
        try:
            return list(zip(self.outputs, self.session.run(self.outputs, sample.feeds, self.run_options)))
        except Exception as e:
            raise BadInputError(f"{sample.origin}: onnxruntime failed on this sample: {str(e).splitlines()[0]}") from e


def _run(runner: _Runner, feeds: FeedData, names: list[str], per_channel: dict[str, int], bins: int | None,
         max_samples: int | None, progress: Callable[[int, int | None], None] | None,
         means: dict[str, int] | None = None) -> Statistics:
    means = means or {}
    accs = {n: _Accumulator(n, per_channel.get(n), runner.routes[n].stacked, bins, means.get(n)) for n in names}
    total = feeds.count
    if max_samples is not None and total is not None:
        total = min(total, max_samples)
    done = 0
    for sample in feeds.samples():
        if max_samples is not None and done >= max_samples:
            break
        values = dict(runner.run(sample))  # a failed sample updated nothing, so a re-instrumented rerun is safe
        for n, acc in accs.items():
            acc.stacked = runner.routes[n].stacked
            acc.update(values[runner.routes[n].output])
        del values, sample  # drop this sample's activations before the next run
        done += 1
        if progress is not None:
            progress(done, total)
    if done == 0:
        raise BadInputError(f"{feeds.description} holds no feed dicts; give at least one calibration sample")
    meta = {"samples": done, "per_channel": per_channel, "loops_flattened": runner.flattened}
    if means:
        meta["means"] = means
    return Statistics({n: accs[n].result() for n in names}, meta)


def _stream(data: Any) -> FeedData:
    """``load_feeds``, except that one-shot sources are streamed instead of being kept (memory stays flat)."""
    if isinstance(data, FeedData) or isinstance(data, (str, os.PathLike, dict, list, tuple)):
        return load_feeds(data)
    if hasattr(data, "get_next") or isinstance(data, Iterator):
        used = [False]

        def once() -> Iterator[tuple[Any, str]]:
            if used[0]:
                raise UsageError("a one-shot data source (iterator or get_next() reader) was read twice")
            used[0] = True
            if hasattr(data, "get_next"):
                i = 0
                while (item := data.get_next()) is not None:
                    yield item, f"reader[{i}]"
                    i += 1
            else:
                for i, item in enumerate(data):
                    yield item, f"feeds[{i}]"

        return FeedData(once, f"stream {type(data).__name__}")
    return load_feeds(data)


def _fingerprint(model: onnx.ModelProto) -> str:
    h = hashlib.sha256()
    try:
        h.update(model.SerializeToString(deterministic=True))
    except ValueError:  # > 2 GB: hash piecewise
        for t in model.graph.initializer:
            h.update(t.SerializeToString(deterministic=True))
        for n in model.graph.node:
            h.update(n.SerializeToString(deterministic=True))
    return h.hexdigest()


def _from_cache(path: Path, request: dict, names: list[str], per_channel: dict[str, int],
                means: dict[str, int] | None = None) -> Statistics | None:
    means = means or {}
    if not path.exists():
        return None
    try:
        cached = Statistics.load(path)
    except BadInputError as e:
        log.warning("ignoring calibration cache: %s", e)
        return None
    if any(cached.meta.get(k) != v for k, v in request.items()):
        log.info("calibration cache %s was made for another model, data or settings; collecting again", path)
        return None
    if any(n not in cached or cached[n].channel_axis != per_channel.get(n)
           or (n in means and cached[n].mean_axis != means[n]) for n in names):
        log.info("calibration cache %s lacks some requested tensors; collecting again", path)
        return None
    log.info("calibration statistics read from cache %s", path)
    meta = {**cached.meta, "per_channel": per_channel}
    meta.pop("means", None)
    if means:
        meta["means"] = means
    return Statistics({n: cached[n] for n in names}, meta)


@contextlib.contextmanager
def _session_source(model: onnx.ModelProto) -> Iterator[onnx.ModelProto | str]:
    """The model itself, or (past protobuf's 2 GB limit) a temporary file with external data."""
    if model.ByteSize() < 2**31 - 2**24:
        yield model
        return
    with tempfile.TemporaryDirectory(prefix="onnxslim_calib_") as tmp:
        path = os.path.join(tmp, "model.onnx")
        onnx.save(model, path, save_as_external_data=True, location="weights.bin")
        yield path


def _load_model(model: onnx.ModelProto | str | Path, base_dir: Path | None) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        proto = model
        if base_dir is not None and _has_external(proto):
            from onnx.external_data_helper import load_external_data_for_model

            proto = onnx.ModelProto()
            proto.CopyFrom(model)
            load_external_data_for_model(proto, str(base_dir))
        return proto
    path = Path(model)
    if not path.exists():
        raise BadInputError(f"model not found: {path}")
    try:
        return onnx.load(str(path))
    except Exception as e:
        raise BadInputError(f"cannot load ONNX model {path}: {e}") from e


def _has_external(model: onnx.ModelProto) -> bool:
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    return any(uses_external_data(t) for t in _get_all_tensors(model))
