"""``auto_compress``: the smallest (or fastest) model that keeps its answers within a budget on the user's data.

1. The lossless pipeline makes the base model (the teacher, and what every candidate starts from).
2. Sensitivity (``probe_layers``): every weight layer alone at every level, scored on calibration data.
3. A greedy path from all-float to all-compressed by least estimated loss per byte; candidates from it at a few
   multiples of the budget, plus each technique alone on every layer (the "best single technique").
4. Every candidate is built by the real passes (with layer-wise distillation when asked) and judged on EVAL by
   the task metric (``evaluate.TaskMetric``), in parallel through an executor; results are cached on disk.
5. Back-off: between the furthest passing and the nearest failing point of the path, bisect (reverting the
   path's last moves, the worst per byte) until they meet or ``refine_rounds`` is spent. When int8 everywhere
   misses the budget, a second track starts from it: nodes go back to float in the order the real int8 model
   ranks them (``revert_int8``: gain per byte), bisected the same way; what the weight probes cannot see
   (activation rounding, Q/DQ boundaries) is measured there.
6. The best passing candidate by the objective is written (rebuilt by the same passes; its bytes checked against
   the evaluated file); the report holds every candidate, the Pareto front and the sensitivity table.

No compressed candidate within the budget: ``passed`` is False and the candidate with the smallest drop is
written to ``failed_output_path(output)``; the caller exits 1.
"""

from __future__ import annotations

import math
import os
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..latency import cpu_count
from ..report import Report
from .cache import CandidateCache, data_identity, file_digest
from .evaluate import TaskMetric, evaluate_candidate, file_bytes
from .executors import make_executor
from .levels import DEFAULT_LEVELS, build_passes, parse_levels, weight_layers
from .plan_search import Objective, checkpoints, greedy_path, pareto_front, path_losses
from .probe_layers import probe_layers

__all__ = ["auto_compress", "AutoResult"]


@dataclass
class AutoResult:
    passed: bool
    output: Path  # where the chosen model (passed) or the best one found (not passed) was written
    report: Report


def _peak_rss_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) / 1024.0


def auto_compress(
    model: str | os.PathLike,
    output: str | os.PathLike,
    *,
    calibration: Any,
    eval_data: Any,
    budget: float = 0.01,
    metric: str | Callable | None = None,
    label_output: str | None = None,
    objective: str = "size",
    levels: str = DEFAULT_LEVELS,
    min_weights: int = 2048,
    probe_samples: int = 8,
    distill: bool = False,
    executor: Any = "local",
    workers: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    refine_rounds: int = 3,
    latency: bool = True,
    plots: bool = True,
    seed: int = 0,
    progress: Callable[[str, int, int | None], None] | None = None,
) -> AutoResult:
    """See the module text. ``budget``: the largest allowed drop of the task metric on ``eval_data`` (accuracy
    points as a fraction with labels, else 1 - agreement with the original's decisions). ``levels``: the menu
    (``int8,share6,share5,share4,share3``; also ``pruneS`` and ``pruneS+shareB``). ``executor``: ``local`` (worker
    processes), ``serial``, ``ray``, ``ray:ADDRESS`` or an object with ``map``. ``cache_dir``: where evaluated
    candidates are kept (default ``OUTPUT.auto-cache``, removed after a successful search unless given)."""
    t0 = time.perf_counter()
    clock = _Stages()
    from ..pipeline import failed_output_path, optimize

    if not budget >= 0:
        raise UsageError(f"--budget must be >= 0 (a metric drop, e.g. 0.01); got {budget}")
    if calibration is None or eval_data is None:
        raise UsageError("--auto needs --calib DIR (calibration data) and --check-data DIR (evaluation data)")
    try:
        menu = parse_levels(levels)
        goal = Objective(objective)
    except ValueError as e:
        raise UsageError(str(e)) from e
    say = progress or (lambda *a: None)
    out_path = Path(output)
    keep_cache = cache_dir is not None
    folder = Path(cache_dir) if cache_dir is not None else out_path.with_name(out_path.name + ".auto-cache")
    folder.mkdir(parents=True, exist_ok=True)
    base_path = folder / "base.onnx"
    _, base_report = optimize(model, None, output=base_path, seed=seed, external_data=False)
    base = str(base_path)
    clock.mark("lossless base")
    import onnx

    layers = weight_layers(onnx.load(base, load_external_data=False), min_weights)
    if not layers:
        raise UsageError(
            f"the model has no named weight layer of >= {min_weights} weights to compress; lower min_weights"
        )
    metric_id = metric if isinstance(metric, str) or metric is None else getattr(metric, "__qualname__", "callable")
    cache = CandidateCache(
        folder,
        {
            "base": file_digest(base),
            "calib": data_identity(calibration),
            "eval": data_identity(eval_data),
            "metric": str(metric_id),
            "label_output": label_output,
            "seed": seed,
            "distill": distill,
        },
    )
    task_metric = TaskMetric(base, eval_data, metric=metric, label_output=label_output)

    ex = make_executor(executor, workers)
    # the probes run in this process while no worker does: one onnxruntime session at a time, on every core
    # the search was given (outputs do not depend on the thread count: its kernels split work by output)
    probe_threads = getattr(ex, "workers", None) or workers or cpu_count()

    # 2. sensitivity
    probe_key = f"sensitivity-{cache.key({'levels': levels, 'samples': str(probe_samples)})}.json"
    table = cache.get_json(probe_key)
    if table is None:
        table = probe_layers(
            base,
            layers,
            menu,
            calibration,
            samples=probe_samples,
            criterion=_probe_criterion(metric, calibration, probe_samples),
            seed=seed,
            progress=progress,
            threads=probe_threads,
        )
        cache.put_json(
            probe_key, {x: {k: (v if math.isfinite(v) else None) for k, v in d.items()} for x, d in table.items()}
        )
    else:
        table = {x: {k: (math.inf if v is None else v) for k, v in d.items()} for x, d in table.items()}

    clock.mark("sensitivity probes")
    # 3. candidates: the greedy path's checkpoints and each technique alone
    order = [lv.name for lv in menu]
    size_of = {x.name: x.size for x in layers}
    gains = {x.name: {lv.name: 4.0 * x.size - lv.bytes(x.size, x.rows) for lv in menu} for x in layers}
    path = greedy_path(table, gains, order)
    spent = path_losses(path, table)
    candidates: list[dict] = []
    seen: dict[str, int] = {}

    def add(config: dict[str, str], label: str, source: str, step: int | None = None, track: str = "path") -> dict:
        key = cache.key(config)
        if key in seen:
            c = candidates[seen[key]]
        else:
            c = {"id": len(candidates), "key": key, "label": label, "source": source, "step": step, "config": config}
        if step is not None:  # one configuration can be a step of both tracks
            c.setdefault("tracks", {}).setdefault(track, step)
        if key in seen:
            return c
        seen[key] = len(candidates)
        candidates.append(c)
        return c

    for lv in menu:
        add({x: lv.name for x in table if math.isfinite(table[x][lv.name])}, f"all {lv.name}", "single")
    for k in checkpoints(spent, budget):
        add(path[k], f"path {k}/{len(path) - 1}", "path", k)

    def run_pending() -> None:
        todo = [c for c in candidates if "size" not in c and "error" not in c]
        tasks = []
        for c in todo:
            hit = cache.get(c["key"])
            if hit is not None:
                c.update(hit, path=str(cache.model_path(c["key"])))
                continue
            tasks.append(
                (
                    c,
                    {
                        "base": base,
                        "layers": [(x.name, x.op, x.weight, x.size) for x in layers],
                        "config": c["config"],
                        "levels": levels,
                        "calibration": calibration,
                        "eval": eval_data,
                        "metric": metric,
                        "label_output": label_output,
                        "seed": seed,
                        "distill": distill,
                        "out": str(cache.model_path(c["key"])),
                    },
                )
            )
        clock.mark("search")
        if tasks:
            results = ex.map(evaluate_candidate, [t for _, t in tasks], lambda d, n: say("auto: candidates", d, n))
            for (c, _), r in zip(tasks, results):
                c.update(r)
                if r.get("error") is None:
                    cache.put(c["key"], r)
        clock.mark("candidates")

    def meets(c: dict) -> bool:
        return c.get("error") is None and "drop" in c and c["drop"] <= budget + 1e-12 and bool(c["config"])

    def refine(track: str, steps: list[dict[str, str]], label: str) -> None:
        """Back-off along a track (step 0 = least compressed): bisect between the furthest passing and the
        nearest failing step until they meet or ``refine_rounds`` is spent."""
        for _ in range(refine_rounds):
            on = [(c["tracks"][track], c) for c in candidates if track in c.get("tracks", {}) and "drop" in c]
            passing = [k for k, c in on if meets(c)]
            if not passing and any(k == 0 for k, _ in on):
                return  # even the least compressed step misses the budget: nothing on this track to find
            lo = max(passing) if passing else 0
            failing = [k for k, c in on if k > lo and not meets(c)]
            if not failing or min(failing) - lo <= 1:
                return
            hi = min(failing)
            n = max(1, min(getattr(ex, "workers", 2), hi - lo - 1))
            for i in range(1, n + 1):
                k = lo + round(i * (hi - lo) / (n + 1))
                if lo < k < hi:
                    add(steps[k], f"{label} {k}/{len(steps) - 1}", "refine", k, track)
            run_pending()

    try:
        run_pending()
        # 5. back-off along the path
        refine("path", path, "path")
        # 5b. int8 everywhere misses the budget: give nodes back to float, ranked in the real int8 model
        reverts = None
        all_int8 = next((c for c in candidates if c["label"] == "all int8" and c["source"] == "single"), None)
        if all_int8 is not None and all_int8.get("error") is None and "drop" in all_int8 and not meets(all_int8):
            reverts = _int8_reverts(cache, base, all_int8, calibration, metric, probe_samples, progress, probe_threads)
            clock.mark("int8 revert ranking")
            order = [r["node"] for r in reverts["ranked"]]
            # first layers keep int8 weights (w8: float activations, the same bytes), then fully float
            for track, layer_level in (("revert", "w8"), ("revert-float", None)):
                steps = revert_steps(all_int8["config"], order, layer_level)
                top = len(steps) - 1
                add(steps[top], "all int8", "single", top, track)  # the track's far end is that candidate
                for k in sorted({min(top, 2**i) for i in range(top.bit_length() + 1)}):
                    add(steps[top - k], f"int8 -{k} {layer_level or 'float'}", "revert", top - k, track)
                run_pending()
                refine(track, steps, f"int8 -> {layer_level or 'float'}")
                if any(meets(c) for c in candidates if track in c.get("tracks", {})):
                    break
    finally:
        if ex is not executor and callable(getattr(ex, "close", None)):
            ex.close()  # the worker processes the local executor kept between rounds

    clock.mark("search")
    # latency of what was measured, one at a time (parallel runs would time each other)
    base_bytes = file_bytes(base)
    if latency or goal.needs_latency:
        from ..latency import measure_latency

        feeds = next(iter(task_metric.engine.feeds), None)
        for c in candidates:
            if c.get("error") is None and "path" in c:
                say("auto: latency", c["id"] + 1, len(candidates))
                lat = measure_latency(base, c["path"], feeds, threads=(1,), budget_s=0.5, seed=seed)
                s = (lat.get("settings") or [{}])[0]
                if lat.get("measured") and s.get("ratio") is not None:
                    c["latency_ms"] = s.get("candidate", {}).get("median_ms")
                    c["latency_ratio"] = s["ratio"]
    clock.mark("latency")
    for c in candidates:
        if c.get("error") is None and "size" in c:
            c["size_ratio"] = c["size"] / base_bytes
            c["meets_budget"] = meets(c)
            c["objective"] = goal.value(c["size_ratio"], c.get("latency_ratio"))
            c["summary"] = _summary(c["config"], size_of)
    ok = [c for c in candidates if c.get("meets_budget")]
    measured = [c for c in candidates if "objective" in c]
    front_idx = pareto_front([(c["objective"], max(c["drop"], 0.0)) for c in measured])
    passed = bool(ok)
    if passed:
        chosen = min(ok, key=lambda c: (c["objective"], c["drop"], c["id"]))
        target = out_path
    elif measured:
        chosen = min(measured, key=lambda c: (c["drop"], c["objective"], c["id"]))
        target = failed_output_path(out_path)
    else:
        raise UsageError("every candidate failed to build; rerun with --verbose to see why")

    # 6. write the choice by the same passes, and check it is the file that was judged
    from .levels import by_name

    named = by_name(menu)
    passes = build_passes({x: named[v] for x, v in chosen["config"].items()}, layers, seed=seed, distill=distill)
    _, report = optimize(
        base, passes, output=target, calibration=calibration, seed=seed, on_pass_error="raise", fixed_point=False
    )
    same = file_digest(target) == file_digest(chosen["path"])
    final = chosen if same else {**chosen, **task_metric.measure(target)}
    clock.mark("write chosen")
    report.input = str(model)
    report.before = base_report.before
    auto = {
        "input": str(model),
        "budget": budget,
        "passed": passed,
        "metric": {
            "kind": task_metric.kind,
            "description": task_metric.describe(),
            "base_value": task_metric.base_value,
        },
        "objective": goal.text,
        "levels": order,
        "distill": distill,
        "layers": [{"name": x.name, "op": x.op, "weights": size_of[x.name]} for x in layers],
        "sensitivity": {x: {k: (v if math.isfinite(v) else None) for k, v in d.items()} for x, d in table.items()},
        "path_steps": len(path) - 1,
        "int8_reverts": reverts,
        "candidates": [{k: v for k, v in c.items() if k not in ("key",)} for c in candidates],
        "pareto": [measured[i]["id"] for i in front_idx],
        "chosen": chosen["id"],
        "chosen_metric": {k: final.get(k) for k in ("value", "drop", "cosine", "snr_db")},
        "written_as_evaluated": same,
        "output": str(target),
        "executor": ex.name,
        "cache": {"folder": str(folder), "hits": cache.hits, "kept": keep_cache or not passed},
        "search_seconds": time.perf_counter() - t0,
        "stage_seconds": clock.seconds,
        "peak_rss_mb": _peak_rss_mb(),
        "plots": {},
    }
    if plots:
        from .plots import plot_pareto, plot_sensitivity

        for name, fn in (("pareto", plot_pareto), ("sensitivity", plot_sensitivity)):
            png = out_path.with_name(out_path.stem + f".{name}.png")
            fn(auto, png)
            auto["plots"][name] = str(png)
    report.auto = auto
    report.seconds = time.perf_counter() - t0
    if passed and not keep_cache:
        shutil.rmtree(folder, ignore_errors=True)
    return AutoResult(passed, target, report)


class _Stages:
    """Wall seconds per stage of the search (a stage met twice adds up), for the report."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + now - self._last, 3)
        self._last = now


def _probe_criterion(metric, calibration, samples: int):
    """Probes rank by the engine's ``decisions``; with a user metric, by the mean of it (on the calibration
    feeds: a model's decisions can hinge on what a cosine does not see) and ``decisions`` (a task metric on a
    few samples is a step function: most single-layer changes flip nothing, and the ranking would be blind)."""
    if metric is None:
        return "decisions"
    from ..data import load_feeds
    from ..sensitivity import decisions_score
    from ..task_metrics import load_metric, user_metric

    fn = load_metric(metric)
    first = []
    for s in load_feeds(calibration).samples():
        first.append(s)
        if len(first) >= samples:
            break

    def criterion(ref: list[dict], cand: list[dict]) -> float:
        value = user_metric(fn, ref, cand, first).get("value", float("nan"))
        return 0.5 * (value + decisions_score(ref, cand))

    return criterion


def revert_steps(int8_config: dict[str, str], order: list[str], layer_level: str | None = None) -> list[dict[str, str]]:
    """A revert track, least compressed first: step ``len(order) - k`` is ``int8_config`` with the first ``k``
    nodes of ``order`` given back: a weight layer of the configuration to ``layer_level`` (``w8``: int8 weights,
    float activations) or, when None, to float (it leaves the configuration); any other node is named at
    ``float`` so the quantizer leaves it out."""
    steps = []
    for k in range(len(order), -1, -1):
        config = dict(int8_config)
        for name in order[:k]:
            if name not in int8_config:
                config[name] = "float"
            elif layer_level:
                config[name] = layer_level
            else:
                del config[name]
        steps.append(config)
    return steps


def _int8_reverts(cache, base, all_int8, calibration, metric, samples, progress, threads: int = 1) -> dict:
    """The revert ranking of the all-int8 candidate (``revert_int8.rank_reverts``), cached beside the candidates."""
    key = f"reverts-{cache.key({'int8': all_int8['key'], 'samples': str(samples)})}.json"
    hit = cache.get_json(key)
    if hit is not None:
        return hit
    from ..graph import load_model
    from .revert_int8 import rank_reverts

    criterion = _probe_criterion(metric, calibration, samples)
    start, ranked = rank_reverts(
        load_model(base).proto,
        load_model(all_int8["path"]).proto,
        calibration,
        samples=samples,
        criterion=criterion,
        progress=progress,
        threads=threads,
    )
    out = {"all_int8_score": start, "reverted": "activations", "ranked": [r.to_dict() for r in ranked]}
    cache.put_json(key, out)
    return out


def _summary(config: dict[str, str], layer_sizes: dict[str, int]) -> str:
    counts: dict[str, int] = {}
    for x, lv in config.items():
        if x in layer_sizes and lv != "float":
            counts[lv] = counts.get(lv, 0) + 1
    rest = len(layer_sizes) - sum(counts.values())
    parts = [f"{n} {lv}" for lv, n in sorted(counts.items())]
    if rest:
        parts.append(f"{rest} float")
    others = sum(1 for x, lv in config.items() if x not in layer_sizes and lv == "float")
    if others:
        parts.append(f"{others} other node{'s' if others > 1 else ''} float")
    return ", ".join(parts)
