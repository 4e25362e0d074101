"""Activation statistics for calibration: one streaming pass over the data, in bounded memory.

``collect_statistics`` builds ONE copy of the model whose graph outputs also expose the requested tensors
(tensors inside If/Loop/Scan bodies are routed out through extra subgraph outputs, see ``calibration_graph``),
runs it sample by sample in onnxruntime with graph optimizations DISABLED (so every name still exists),
reduces each sample's activations into running statistics and drops them. Peak memory is one sample's
requested activations plus fixed-size state per tensor (min/max, per-channel min/max, a ``bins``-bin
histogram); it does not grow with the number of samples. Samples may differ in shape. If stacking a Loop
tensor over iterations fails (its shape changes from one iteration to the next), the model is instrumented
once more with flattened loop-carried values and the same sample is rerun (nothing was counted from it).

The running statistics themselves (``TensorStats``, ``Statistics``, the streaming accumulator) live in
``calibration_stats``; range selection on the histogram (percentile, entropy/KL, mse) in ``calibration_ranges``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .calibration_accumulator import _Accumulator
from .calibration_graph import expose_tensors
from .calibration_stats import RANGE_METHODS, ConvPatches, Statistics, TensorStats
from .data import FeedData, load_feeds
from .errors import BadInputError, UsageError
from .graph import external_path
from .temp_files import private_temp_dir

__all__ = ["TensorStats", "Statistics", "ConvPatches", "collect_statistics", "RANGE_METHODS"]

log = logging.getLogger(__name__)


def collect_statistics(
    model: onnx.ModelProto | str | Path,
    data: FeedData | Any,
    tensors: Iterable[str],
    *,
    per_channel: Mapping[str, int] | None = None,
    means: Mapping[str, int] | None = None,
    grams: Mapping[str, int | ConvPatches] | None = None,
    norms: Mapping[str, int] | None = None,
    keep: Iterable[str] = (),
    keep_samples: int = 0,
    histograms: bool | Iterable[str] = True,
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
    (``TensorStats.channel_mean``; bias correction uses it). ``grams``: tensor name -> feature axis whose
    second-moment matrix ``sum x x^T`` over all other positions is wanted (``TensorStats.gram``, C x C float64;
    GPTQ weight rounding uses it), or a ``ConvPatches`` (the Gram of a Conv's input patches). ``norms``: tensor
    name -> channel axis whose per-channel L2 norm is wanted (``TensorStats.channel_norm``; importance for
    pruning). ``keep``: tensors whose values are kept, sample by sample, for the first ``keep_samples`` samples
    (``Statistics.values``: a teacher's intermediate outputs; memory grows with ``keep_samples``, not with
    the data). ``histograms``: True (every tensor), False, or the names that need one
    (percentile / entropy / mse ranges). ``progress(done, total)`` is called after
    each sample (``total`` is None when
    the source does not know its length). ``cache``: a JSON file; when it holds statistics collected with
    the same model, data description, tensors (or more), per-channel axes, bins and max_samples, they are
    returned without running anything; otherwise they are collected and written there. The data itself is
    identified by its description only (path and file count): delete the cache after changing the files.
    """
    proto, data_dir = _load_model(model, base_dir)
    names = list(dict.fromkeys(tensors))
    per_channel = dict(per_channel or {})
    unknown = sorted(set(per_channel) - set(names))
    if unknown:
        raise UsageError(f"per_channel names tensor(s) not requested: {', '.join(unknown)}; add them to tensors")
    means = dict(means or {})
    grams = dict(grams or {})
    norms = dict(norms or {})
    keep = list(dict.fromkeys(keep))
    if keep and keep_samples < 1:
        raise UsageError("keep names tensors to keep but keep_samples is 0; give how many samples to keep")
    hist_names = set(names) if histograms is True else set() if histograms is False else set(histograms)
    for what, asked in (
        ("means", means),
        ("grams", grams),
        ("norms", norms),
        ("keep", keep),
        ("histograms", hist_names),
    ):
        unknown = sorted(set(asked) - set(names))
        if unknown:
            raise UsageError(f"{what} names tensor(s) not requested: {', '.join(unknown)}; add them to tensors")
    if bins < 8 and hist_names:
        raise UsageError(f"bins={bins} is too few for range selection; use at least 8 (default 2048)")
    if max_samples is not None and max_samples < 1:
        raise UsageError(f"max_samples={max_samples}; give a positive number or None")

    feeds = _stream(data).bind(proto)
    request = {
        "model_sha256": model_state(proto),
        "data": feeds.description,
        "bins": bins if hist_names else None,
        "max_samples": max_samples,
    }
    if cache is not None and not keep:  # kept values are never cached
        hit = _from_cache(Path(cache), request, names, per_channel, means, grams, hist_names, norms)
        if hit is not None:
            return hit

    with contextlib.ExitStack() as stack:  # temporary external-data files live as long as their session
        runner = _Runner(proto, names, per_channel, stack, data_dir)
        stats = _run(
            runner,
            feeds,
            names,
            per_channel,
            {n: bins for n in hist_names},
            max_samples,
            progress,
            means,
            grams,
            norms,
            keep,
            keep_samples,
        )
    stats.meta.update(request)
    if cache is not None:
        stats.save(cache)
    return stats


class _Runner:
    """The instrumented session; re-instrumented once with flattened Loop outputs if stacking them fails."""

    def __init__(
        self,
        proto: onnx.ModelProto,
        names: list[str],
        per_channel: dict[str, int],
        stack: contextlib.ExitStack,
        data_dir: Path | None = None,
    ):
        self.proto, self.names, self.per_channel, self.stack = proto, names, per_channel, stack
        self.data_dir = data_dir
        self.flattened = False
        self._build(flatten_loops=False)

    def _build(self, flatten_loops: bool) -> None:
        from .runtime import make_session

        instrumented, self.routes = expose_tensors(self.proto, self.names, flatten_loops=flatten_loops)
        src, files = self.stack.enter_context(_session_source(instrumented, self.data_dir))
        try:
            self.session = make_session(src, "cpu", optimize=False, external_files=files).session
        except BadInputError as e:
            raise BadInputError(
                f"calibration runs the model in onnxruntime, which cannot load it: {e}. Check "
                "that the original model runs in onnxruntime (an exporter may have written an "
                "op it does not know) and fix the export"
            ) from e
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
                f"{sample.origin}: onnxruntime failed on this sample: {str(first).splitlines()[0]}"
            ) from first
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


def _run(
    runner: _Runner,
    feeds: FeedData,
    names: list[str],
    per_channel: dict[str, int],
    bins: dict[str, int],
    max_samples: int | None,
    progress: Callable[[int, int | None], None] | None,
    means: dict[str, int] | None = None,
    grams: dict[str, int] | None = None,
    norms: dict[str, int] | None = None,
    keep: list[str] | None = None,
    keep_samples: int = 0,
) -> Statistics:
    means, grams, norms, keep = means or {}, grams or {}, norms or {}, keep or []
    accs = {
        n: _Accumulator(
            n, per_channel.get(n), runner.routes[n].stacked, bins.get(n), means.get(n), grams.get(n), norms.get(n)
        )
        for n in names
    }
    kept: dict[str, list[np.ndarray]] = {n: [] for n in keep}
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
        if done < keep_samples:
            for n in keep:
                kept[n].append(np.array(values[runner.routes[n].output]))
        del values, sample  # drop this sample's activations before the next run
        done += 1
        if progress is not None:
            progress(done, total)
    if done == 0:
        raise BadInputError(f"{feeds.description} holds no feed dicts; give at least one calibration sample")
    meta = {"samples": done, "per_channel": per_channel, "loops_flattened": runner.flattened}
    if means:
        meta["means"] = means
    if grams:
        meta["grams"] = {k: ConvPatches.to_json(v) for k, v in grams.items()}
    if norms:
        meta["norms"] = norms
    return Statistics({n: accs[n].result() for n in names}, meta, kept)


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


def model_state(model: onnx.ModelProto) -> str:
    """A hash of what the model computes (nodes, weights, I/O, opsets), whatever the order of its nodes and
    initializers: equal hashes, equal statistics on the same data. Each part is hashed alone, so models over
    protobuf's 2 GB limit hash too."""

    def digests(parts) -> list[bytes]:
        return sorted(hashlib.sha256(x.SerializeToString(deterministic=True)).digest() for x in parts)

    g = model.graph
    h = hashlib.sha256()
    for group in (g.node, g.initializer, g.sparse_initializer, g.input, g.output, model.opset_import, model.functions):
        h.update(b"".join(digests(group)) + b"|")
    return h.hexdigest()


def _from_cache(
    path: Path,
    request: dict,
    names: list[str],
    per_channel: dict[str, int],
    means: dict[str, int] | None = None,
    grams: dict[str, int] | None = None,
    hist_names: set[str] | None = None,
    norms: dict[str, int] | None = None,
) -> Statistics | None:
    means, grams, hist_names, norms = means or {}, grams or {}, hist_names or set(), norms or {}
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
    if any(
        n not in cached
        or cached[n].channel_axis != per_channel.get(n)
        or not cached[n].holds(mean=means.get(n), gram=grams.get(n), norm=norms.get(n), histogram=n in hist_names)
        for n in names
    ):
        log.info("calibration cache %s lacks some requested tensors; collecting again", path)
        return None
    log.info("calibration statistics read from cache %s", path)
    meta = {**cached.meta, "per_channel": per_channel}
    meta.pop("means", None)
    meta.pop("grams", None)
    meta.pop("norms", None)
    if means:
        meta["means"] = means
    if grams:
        meta["grams"] = {k: ConvPatches.to_json(v) for k, v in grams.items()}
    if norms:
        meta["norms"] = norms
    return Statistics({n: cached[n] for n in names}, meta)


@contextlib.contextmanager
def _session_source(model: onnx.ModelProto, data_dir: Path | None = None) -> Iterator[tuple[Any, dict | None]]:
    """What onnxruntime loads, and external files to hand it in memory (or None).

    The model itself when small and self-contained. When its weights are in external files (``data_dir``): a
    temporary folder with the model and hard links to those files, so onnxruntime maps the weights from disk
    itself and nothing is copied into Python (large_300M, 1.2 GB of weights: the session peaks at ~1.1 GB RSS;
    onnxruntime refuses symbolic links that leave the model's folder). Where hard links are impossible (another
    file system), the files are memory-mapped and handed over with the session options (onnxruntime then
    copies the weights once: ~2x). Past protobuf's 2 GB limit, the in-memory tensors move to a temporary file."""
    locations = _external_locations(model) if data_dir is not None else set()
    if not locations and model.ByteSize() < 2**31 - 2**24:
        yield model, None
        return
    with private_temp_dir("calib") as tmp:
        in_memory: dict[str, np.memmap] = {}
        for loc in sorted(locations):
            src, dst = external_path(Path(data_dir), loc, f"(data file {loc})"), Path(tmp) / loc
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dst)
            except OSError:
                if not src.is_file():
                    raise BadInputError(
                        f"external data file '{loc}' of the model is missing in {data_dir}; put it next to the model"
                    ) from None
                in_memory[loc] = np.memmap(src, dtype=np.uint8, mode="r")
        path = os.path.join(tmp, "model.onnx")
        if model.ByteSize() < 2**31 - 2**24:
            Path(path).write_bytes(model.SerializeToString())
        else:  # moves only tensors held in memory; the linked ones stay where they are
            onnx.save(model, path, save_as_external_data=True, location="onnxslim_in_memory.bin", size_threshold=1024)
        yield path, in_memory or None


def _external_locations(model: onnx.ModelProto) -> set[str]:
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    out = set()
    for t in _get_all_tensors(model):
        if uses_external_data(t):
            out.update(e.value for e in t.external_data if e.key == "location")
    return out


def _load_model(model: onnx.ModelProto | str | Path, base_dir: Path | None) -> tuple[onnx.ModelProto, Path | None]:
    """The model without its external weights read in, and the folder they are in (None: none)."""
    if isinstance(model, onnx.ModelProto):
        return model, (Path(base_dir) if base_dir is not None and _external_locations(model) else None)
    path = Path(model)
    if not path.exists():
        raise BadInputError(f"model not found: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise BadInputError(f"cannot load ONNX model {path}: {e}") from e
    return proto, (path.resolve().parent if _external_locations(proto) else None)
