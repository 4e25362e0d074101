"""onnxruntime CPU latency of an original model and its optimized result, measured the same way for both.

Why: size, parity and accuracy do not show speed, and an optimization can make a model slower (int8 QDQ on
a CPU without fast int8 kernels can run 1.5-3x slower than fp32). The report therefore shows what a user
would see when deploying both models:

- the same session options for both: graph optimizations ``ORT_ENABLE_ALL`` (as deployed), intra-op threads
  1 and this machine's cores (``os.sched_getaffinity``), inter-op threads 1;
- the two models' runs interleaved (original, candidate, original, ...) so machine noise hits both alike;
- warm-up runs excluded; per thread setting the median, p10/p90, min and number of runs, and the ratio
  candidate/original of the medians;
- bounded cost: at least ``min_runs`` runs and then until ``budget_s`` seconds or ``max_runs`` runs,
  whichever comes first, with a hard stop at ``limit_s`` seconds per setting for very slow models.

Latency is informational: every failure (a session that cannot be made, a run that fails, feeds that cannot
be built) becomes ``{"measured": False, "reason": "one line"}``, never an exception.
"""

from __future__ import annotations

import gc
import logging
import os
import platform
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx

from .graph import iter_graphs

__all__ = ["measure_latency", "latency_feeds", "machine_facts", "cpu_count"]

log = logging.getLogger(__name__)

WARMUP = 2  # runs per model per setting before timing (the first run allocates and plans)
MIN_RUNS = 5
MAX_RUNS = 100
BUDGET_S = 2.0  # per thread setting, both models' timed runs together
LIMIT_FACTOR = 4  # hard stop per setting at LIMIT_FACTOR * budget_s, even below min_runs


def cpu_count() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


MAX_TENSOR_BYTES = 256 * 2**20  # the same bound fold_constants puts on what it materializes


def largest_tensor(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> tuple[int, str]:
    """(bytes, name) of the largest tensor whose size shape inference knows when ``model`` runs on ``feeds``:
    timing a model that materializes gigabytes would take the machine's memory (a 177-byte model can). Read from
    a copy that keeps only small constants' data (the shapes of the others are inputs to inference)."""
    m = _light_copy(model)
    g = m.graph
    for vi in g.input:
        if vi.name in feeds and vi.type.HasField("tensor_type"):
            shape = vi.type.tensor_type.shape
            shape.ClearField("dim")
            for d in np.asarray(feeds[vi.name]).shape:
                shape.dim.add().dim_value = int(d)
    try:
        inferred = onnx.shape_inference.infer_shapes(m, check_type=False, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - nothing known: nothing to refuse on
        return 0, ""
    best = (0, "")
    for sub in iter_graphs(inferred.graph):
        for vi in list(sub.value_info) + list(sub.output):
            tt = vi.type.tensor_type
            if not vi.type.HasField("tensor_type") or not tt.HasField("shape"):
                continue
            dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
            if any(d is None for d in dims):
                continue
            try:
                item = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).itemsize
            except Exception:  # noqa: BLE001 - strings and unknown types: no fixed size
                continue
            best = max(best, (int(np.prod(dims, dtype=np.float64)) * item, vi.name))
    return best


def _nbytes(t: onnx.TensorProto) -> int:
    return len(t.raw_data) if t.HasField("raw_data") else int(np.prod(t.dims or [1])) * 4


def _light_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its large initializers turned into graph inputs of the same type and shape (no data)."""
    m = onnx.ModelProto()
    for f in ("ir_version", "opset_import", "functions"):
        if f == "ir_version":
            m.ir_version = model.ir_version
        else:
            getattr(m, f).extend(getattr(model, f))
    src, g = model.graph, m.graph
    g.name = src.name
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    declared = {i.name for i in src.input}
    for t in src.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL and _nbytes(t) <= 4096:
            g.initializer.append(t)
        elif t.name not in declared:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return m


def machine_facts() -> dict[str, Any]:
    """Cores and architecture (the int8 target and its deciding CPU flags are in the quantize pass's note)."""
    return {"cpus": cpu_count(), "machine": platform.machine()}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


def _first_feeds(data: Any) -> dict[str, np.ndarray]:
    if isinstance(data, Mapping):
        return {k: np.asarray(v) for k, v in data.items() if not str(k).startswith("__")}
    for feeds in data if isinstance(data, Iterable) else []:
        return {k: np.asarray(v) for k, v in feeds.items() if not str(k).startswith("__")}
    raise ValueError("the data holds no feed dicts")


def latency_feeds(
    model: onnx.ModelProto, calibration: Any = None, check_data: Any = None, seed: int = 0
) -> tuple[dict[str, np.ndarray], str, str]:
    """The feeds to time with, ``(feeds, source, description)``: the calibration data's first sample when
    there is calibration data, else the check data's, else one seeded synthetic feed."""
    from .data import FeedData, load_feeds

    for source, data in (("calibration", calibration), ("check data", check_data)):
        if data is None:
            continue
        fd = data if isinstance(data, FeedData) else load_feeds(data)
        fd = fd.bind(model)
        return _first_feeds(fd), source, fd.description
    from .synthetic import synthetic_feeds

    fd = synthetic_feeds(model, count=1, seed=seed)
    return _first_feeds(fd), "synthetic", fd.description


def _run_once(session, feeds: dict[str, np.ndarray]) -> float:
    """One run of one session; seconds it took (tests replace this to watch the order of runs)."""
    t0 = time.perf_counter()
    session.run(None, feeds)
    return time.perf_counter() - t0


def _stats(seconds: Sequence[float]) -> dict[str, float]:
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    p10, med, p90 = np.percentile(ms, [10, 50, 90])
    return {
        "median_ms": round(float(med), 6),
        "p10_ms": round(float(p10), 6),
        "p90_ms": round(float(p90), 6),
        "min_ms": round(float(ms.min()), 6),
    }


def _measure_setting(
    original, candidate, feeds, threads: int, warmup: int, min_runs: int, max_runs: int, budget_s: float, limit_s: float
) -> dict[str, Any]:
    from .runtime import make_session

    sessions = []
    for which, model in (("original", original), ("candidate", candidate)):
        try:
            sessions.append(make_session(model, "cpu", optimize=True, threads=threads).session)
        except Exception as e:  # noqa: BLE001 - informational: a reason, never a failed optimize
            raise _Failed(f"no onnxruntime CPU session for the {which}: {_first_line(e)}") from None
    ins = [{i.name for i in s.get_inputs()} for s in sessions]
    missing = sorted((ins[0] | ins[1]) - set(feeds))
    if missing:
        raise _Failed(f"the feeds lack input(s) {', '.join(missing)}")
    per = [{k: v for k, v in feeds.items() if k in names} for names in ins]
    times: list[list[float]] = [[], []]
    stopped = "max_runs"
    was_enabled = gc.isenabled()
    gc.disable()  # a collection inside one model's run would be charged to that model only
    t_start = time.perf_counter()
    try:
        for _ in range(max(1, warmup)):
            for k in (0, 1):
                _guarded(sessions[k], per[k], k)
            if time.perf_counter() - t_start > budget_s:
                break  # a slow model: one warm-up round is enough
        t0 = time.perf_counter()
        while len(times[1]) < max_runs:
            for k in (0, 1):  # interleaved: original, candidate, original, candidate, ...
                times[k].append(_guarded(sessions[k], per[k], k))
            elapsed = time.perf_counter() - t0
            if len(times[1]) >= min_runs and elapsed >= budget_s:
                stopped = "budget"
                break
            if time.perf_counter() - t_start >= limit_s:
                stopped = "limit"
                break
        seconds = time.perf_counter() - t_start
    finally:
        if was_enabled:
            gc.enable()
    a, b = _stats(times[0]), _stats(times[1])
    return {
        "threads": threads,
        "intra_op_threads": threads,
        "inter_op_threads": 1,
        "runs": len(times[1]),
        "original": a,
        "candidate": b,
        "ratio": round(b["median_ms"] / a["median_ms"], 6) if a["median_ms"] > 0 else None,
        "stopped": stopped,
        "seconds": round(seconds, 4),
    }


class _Failed(Exception):
    pass


def _guarded(session, feeds, k: int) -> float:
    try:
        return _run_once(session, feeds)
    except _Failed:
        raise
    except Exception as e:  # noqa: BLE001
        raise _Failed(f"the {('original', 'candidate')[k]} failed to run: {_first_line(e)}") from None


def measure_latency(
    original: str | os.PathLike | onnx.ModelProto,
    candidate: str | os.PathLike | onnx.ModelProto,
    feeds: Mapping[str, Any] | Iterable[Mapping[str, Any]],
    *,
    threads: Sequence[int | None] = (1, None),
    warmup: int = WARMUP,
    min_runs: int = MIN_RUNS,
    max_runs: int = MAX_RUNS,
    budget_s: float = BUDGET_S,
    limit_s: float | None = None,
    seed: int = 0,
    feeds_source: str | None = None,
    feeds_description: str | None = None,
    max_tensor_bytes: int = MAX_TENSOR_BYTES,
    protos: tuple[onnx.ModelProto, onnx.ModelProto] | None = None,
) -> dict[str, Any]:
    """CPU latency of ``original`` and ``candidate`` (paths, external data next to them, or ModelProtos)
    per thread setting (``None``: this machine's cores; settings that resolve to the same count run once).
    ``feeds``: one feed dict, or an iterable of them (the first is used). Never raises; see the module text.
    Per setting: ``warmup`` untimed rounds, then at least ``min_runs`` timed rounds and more until ``budget_s``
    seconds or ``max_runs`` rounds; ``limit_s`` (default ``4 * budget_s``) stops a setting even below
    ``min_runs``, so a very slow model stays bounded. ``seed`` is recorded only (runs have no randomness).
    ``protos``: the two models' protos when the caller holds them (read for tensor sizes instead of loading)."""
    limit_s = LIMIT_FACTOR * budget_s if limit_s is None else limit_s
    t_start = time.perf_counter()
    out: dict[str, Any] = {
        "measured": False,
        "reason": None,
        "provider": "CPUExecutionProvider",
        "graph_optimization": "ORT_ENABLE_ALL",
        "order": "interleaved",
        "original": _name(original),
        "candidate": _name(candidate),
        "feeds": feeds_source,
        "feeds_description": feeds_description,
        "warmup": warmup,
        "min_runs": min_runs,
        "max_runs": max_runs,
        "budget_s": budget_s,
        "limit_s": limit_s,
        "seed": seed,
        "settings": [],
        "machine": None,
        "seconds": 0.0,
    }
    try:
        out["machine"] = machine_facts()
    except Exception as e:  # noqa: BLE001 - informational
        log.debug("machine facts: %s", e)
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        out["reason"] = "onnxruntime is not installed"
        return out
    try:
        feed_dict = _first_feeds(feeds)
    except Exception as e:  # noqa: BLE001
        out["reason"] = f"no feeds to time with: {_first_line(e)}"
        return out
    for side, model, held in zip(("input", "result"), (original, candidate), protos or (None, None)):
        try:
            proto = held if held is not None else model
            if not isinstance(proto, onnx.ModelProto):
                proto = onnx.load(str(model), load_external_data=False)
            size, name = largest_tensor(proto, feed_dict)
        except Exception as e:  # noqa: BLE001 - informational: an unreadable model is reported by the session
            log.debug("largest tensor of the %s: %s", side, e)
            continue
        if size > max_tensor_bytes:
            out["reason"] = (
                f"the {side} model makes a {size / 2**30:.1f} GiB tensor ('{name}') on these feeds, over the "
                f"{max_tensor_bytes / 2**20:.0f} MiB that latency measurement allows"
            )
            return out
    if out["feeds_description"] is None:
        out["feeds_description"] = ", ".join(f"{k} {list(v.shape)} {v.dtype}" for k, v in feed_dict.items())
    cores = cpu_count()
    counts = list(dict.fromkeys(int(t) if t else cores for t in threads))
    try:
        for t in counts:
            out["settings"].append(
                _measure_setting(
                    original, candidate, feed_dict, t, warmup, max(1, min_runs), max_runs, budget_s, limit_s
                )
            )
        out["measured"] = True
    except _Failed as e:
        out["reason"] = str(e)
        out["settings"] = []
    except Exception as e:  # noqa: BLE001 - latency never fails an optimize run
        out["reason"] = f"latency measurement failed: {type(e).__name__}: {_first_line(e)}"
        out["settings"] = []
    out["seconds"] = round(time.perf_counter() - t_start, 4)
    return out


def not_measured(reason: str) -> dict[str, Any]:
    """The latency section of a run that did not measure, with why."""
    return {"measured": False, "reason": reason, "settings": []}


def _name(model) -> str:
    return str(model) if isinstance(model, (str, os.PathLike)) else "(in memory)"
