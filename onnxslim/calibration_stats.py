"""Running statistics of calibration tensors: what ``collect_statistics`` keeps of each sample.

Per tensor (float64 throughout): min/max, per-channel min/max, per-channel means (bias correction), the second-
moment (Gram) matrix ``sum x x^T`` over one feature axis (GPTQ weight rounding), per-channel L2 norms (importance),
and a streaming histogram (percentile / entropy / mse ranges). All are fixed-size: memory does not grow with the
samples.

The streaming reductions that fill them live in ``calibration_accumulator``.
"""

from __future__ import annotations

import json
import math
import os
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
