"""Build one candidate with the real passes and judge it on the evaluation data: what a search worker runs.

``evaluate_candidate(task)`` takes plain data (paths, the configuration as layer -> level names) so it can run
in another process or on a Ray worker; it writes the candidate model to ``task["out"]`` and returns its file
size and its task metric on EVAL. The metric (``TaskMetric``) is built once per process and reused.

The metric, in the order the issue of the user's data decides it:
- ``metric`` given (``script.py:function`` or a callable ``fn(reference_outputs, candidate_outputs, samples)``):
  that value, higher is better, its drop measured from the original's own value;
- EVAL has ``__label__`` and a label output is found: accuracy, drop from the original's accuracy;
- otherwise agreement with the original's own decisions (the sensitivity engine's ``decisions`` criterion:
  worst of cosine, worst-channel cosine and top-1 agreement over float outputs), drop = 1 - agreement.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx

__all__ = ["TaskMetric", "evaluate_candidate", "file_bytes"]


def file_bytes(path: str | os.PathLike) -> int:
    """A model's bytes on disk: the .onnx file plus the external data files it names (the pipeline's own count)."""
    from ..graph import load_model
    from ..pipeline import _file_size

    return _file_size(Path(path), load_model(path))


class TaskMetric:
    """The task metric of candidates against the original (``reference``) on ``data``; see the module text."""

    def __init__(
        self,
        reference: str | os.PathLike,
        data: Any,
        *,
        metric: str | Callable | None = None,
        label_output: str | None = None,
        max_samples: int | None = None,
    ):
        from ..data import LABEL_KEY, load_feeds
        from ..graph import load_model
        from ..sensitivity import SensitivityEngine
        from ..task_metrics import accuracy, find_label_output, load_metric, user_metric

        ref = load_model(reference).proto
        samples = list(load_feeds(data).bind(ref).check_first().samples())
        if max_samples:
            samples = samples[:max_samples]
        feeds = [s.feeds for s in samples]
        names = [o.name for o in ref.graph.output]
        fn = load_metric(metric)
        self.label_output = None
        if fn is not None:
            self.kind = "user"
            criterion = lambda r, c: user_metric(fn, r, c, samples).get("value", float("nan"))  # noqa: E731
        else:
            self.kind, criterion = "agreement", "decisions"
        # one reference run: the label output is found from it, and the criterion set after
        self.engine = SensitivityEngine(ref, feeds, samples=max(1, len(feeds)), modes=(True,), criterion="decisions")
        if fn is None and samples and LABEL_KEY in samples[0].meta:
            first = self.engine._per_sample(self.engine.reference[True])
            self.label_output = find_label_output(names, first, samples, label_output)
            if self.label_output:
                self.kind = "accuracy"
                criterion = lambda r, c: accuracy(c, samples, self.label_output)  # noqa: E731
        self.engine.criterion = criterion
        self.samples = len(samples)
        self.base_value = 1.0 if self.kind == "agreement" else self.engine.measure(ref).score

    def describe(self) -> str:
        what = {
            "accuracy": f"accuracy of output '{self.label_output}' against __label__",
            "agreement": "agreement with the original's decisions (worst of cosine, worst-channel cosine, top-1)",
            "user": "the user metric",
        }[self.kind]
        return f"{what} on {self.samples} evaluation feeds"

    def measure(self, candidate: str | os.PathLike | onnx.ModelProto) -> dict[str, float]:
        from ..graph import load_model

        damage = self.engine.measure(load_model(candidate).proto)
        return {
            "value": float(damage.score),
            "drop": float(self.base_value - damage.score),
            "cosine": float(damage.cosine),
            "snr_db": float(damage.snr_db),
        }


_METRICS: dict[tuple, TaskMetric] = {}


def _metric_for(task: dict) -> TaskMetric:
    key = (task["base"], str(task["eval"]), str(task.get("metric")), task.get("label_output"))
    if key not in _METRICS:
        _METRICS.clear()  # one search per process at a time: keep memory to one reference
        _METRICS[key] = TaskMetric(
            task["base"], task["eval"], metric=task.get("metric"), label_output=task.get("label_output")
        )
    return _METRICS[key]


_SERVICES: dict[tuple, Any] = {}


def _statistics_for(task: dict):
    """One calibration service per process and search: every candidate is built from the same base model, so
    what its first pass asks of the base (share_weights' Grams, the int8 ranges and GPTQ Grams of an int8-only
    candidate) is collected once, not once per candidate."""
    from ..calibration_service import CalibrationService
    from ..graph import load_model

    key = (task["base"], str(task["calibration"]))
    if key not in _SERVICES:
        _SERVICES.clear()
        _SERVICES[key] = CalibrationService.for_model(load_model(task["base"]), task["calibration"], keep_states=2)
    return _SERVICES[key]


def evaluate_candidate(task: dict) -> dict:
    """Build ``task["config"]`` from ``task["base"]`` into ``task["out"]`` and measure it (see the module text).
    A candidate whose passes fail is a result with ``error`` set, never an exception: the search goes on."""
    from ..errors import OnnxSlimError
    from ..pipeline import optimize
    from .levels import WeightLayer, build_passes, by_name, parse_levels

    t0 = time.perf_counter()
    levels = by_name(parse_levels(task["levels"]))
    layers = [WeightLayer(*x) for x in task["layers"]]
    config = {name: levels[lv] for name, lv in task["config"].items()}
    out: dict[str, Any] = {"error": None, "path": task["out"]}
    try:
        passes = build_passes(config, layers, seed=task.get("seed", 0), distill=task.get("distill", False))
        if passes:
            optimize(
                task["base"],
                passes,
                output=task["out"],
                calibration=task["calibration"],
                seed=task.get("seed", 0),
                on_pass_error="raise",
                fixed_point=False,
                statistics=_statistics_for(task),
            )
        else:
            Path(task["out"]).write_bytes(Path(task["base"]).read_bytes())
        out["size"] = file_bytes(task["out"])
        out.update(_metric_for(task).measure(task["out"]))
    except (OnnxSlimError, ValueError, RuntimeError) as e:
        out["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    out["seconds"] = time.perf_counter() - t0
    return out
