"""Calibration statistics as a shared service: passes ask, one streaming run answers, answers are reused.

A pass says what it needs as a ``StatisticsRequest`` (activation ranges and histograms, per-channel means,
input Gram matrices, per-channel norms, kept intermediate outputs of the model as a teacher) and gets a
``Statistics`` back from ``PassContext.statistics(request)``. The pipeline holds one ``CalibrationService``
per run, over the run's calibration data: each request is served by ONE streaming pass of
``collect_statistics`` (bounded memory: fixed-size state per tensor, plus the kept values asked for), and the
answer is cached by the model's state (a hash of the graph as it was asked about), so a later request for
numbers already collected on the same graph, by the same pass or another, runs nothing. Merge what one pass
needs into one request (``a | b``): two requests on the same graph that the cache cannot cover run twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from .calibration import collect_statistics, model_state
from .calibration_stats import ConvPatches, Statistics
from .errors import UsageError

__all__ = ["StatisticsRequest", "CalibrationService"]

log = logging.getLogger(__name__)


@dataclass
class StatisticsRequest:
    """What a pass needs from the calibration data, by tensor name (tensors of If/Loop/Scan bodies too).

    ``tensors``: running min/max (``TensorStats.range``); ``per_channel`` / ``means`` / ``grams`` / ``norms``:
    name -> axis for per-channel min/max, per-channel means, the Gram matrix ``sum x x^T`` over that axis (or a
    ``ConvPatches``), per-channel L2 norms; ``histograms``: names needing a histogram (percentile, entropy,
    mse ranges); ``keep``: names whose values are kept for the first ``keep_samples`` samples (a teacher's
    intermediate outputs). Every name in the maps is collected, whether or not it is also in ``tensors``."""

    tensors: tuple[str, ...] = ()
    per_channel: dict[str, int] = field(default_factory=dict)
    means: dict[str, int] = field(default_factory=dict)
    grams: dict[str, int | ConvPatches] = field(default_factory=dict)
    norms: dict[str, int] = field(default_factory=dict)
    histograms: frozenset[str] = frozenset()
    keep: tuple[str, ...] = ()
    keep_samples: int = 0

    def names(self) -> list[str]:
        """Every tensor the request touches, in a stable order (requested first, then the maps' own)."""
        return list(
            dict.fromkeys(
                [
                    *self.tensors,
                    *self.per_channel,
                    *self.means,
                    *self.grams,
                    *self.norms,
                    *sorted(self.histograms),
                    *self.keep,
                ]
            )
        )

    def __or__(self, other: StatisticsRequest) -> StatisticsRequest:
        """Both requests in one (one run serves it); the same tensor asked along two axes is an error."""
        merged = {}
        for what in ("per_channel", "means", "grams", "norms"):
            mine, theirs = getattr(self, what), getattr(other, what)
            clash = sorted(k for k in set(mine) & set(theirs) if mine[k] != theirs[k])
            if clash:
                raise UsageError(
                    f"statistics requests disagree on the {what} axis of {', '.join(clash)}; ask "
                    "for one axis per tensor"
                )
            merged[what] = {**mine, **theirs}
        return StatisticsRequest(
            tensors=tuple(dict.fromkeys([*self.tensors, *other.tensors])),
            **merged,
            histograms=self.histograms | other.histograms,
            keep=tuple(dict.fromkeys([*self.keep, *other.keep])),
            keep_samples=max(self.keep_samples, other.keep_samples),
        )

    def covered_by(self, answer: Statistics) -> bool:
        """True when ``answer`` (collected for another request) holds everything this request needs."""
        for n in self.names():
            st = answer.get(n)
            if st is None or not st.holds(
                per_channel=self.per_channel.get(n),
                mean=self.means.get(n),
                gram=self.grams.get(n),
                norm=self.norms.get(n),
                histogram=n in self.histograms,
            ):
                return False
        if self.keep and (
            answer.meta.get("samples_kept", 0) < min(self.keep_samples, answer.meta.get("samples", 0))
            or any(n not in answer.values for n in self.keep)
        ):
            return False
        return True


class CalibrationService:
    """Answers statistics requests over one calibration data source, caching the answers by model state.

    ``progress(stage, done, total)`` is called once per sample of each streaming run (stage "calibration").
    ``runs`` counts the streaming runs made (each is one pass over the data). ``keep_states``: how many model
    states' answers are kept (1: only the latest, since a pass that changed the graph made the others stale; a
    caller building many variants of one model, like the automatic search, keeps the base model's too)."""

    def __init__(
        self,
        data: Any,
        base_dir: Path | None = None,
        progress: Callable[[str, int, int | None], None] | None = None,
        keep_states: int = 1,
    ):
        self.data, self.base_dir, self.progress = data, base_dir, progress
        self.keep_states = max(1, keep_states)
        self.runs = 0
        self._answers: list[tuple[str, StatisticsRequest, Statistics]] = []

    @classmethod
    def for_model(cls, loaded, calibration: Any, *, keep_states: int = 1, progress=None) -> CalibrationService:
        """A service over ``calibration`` bound to a loaded model's inputs (``graph.load_model``), as the pipeline
        makes one; external data is read next to the model."""
        from .data import load_feeds

        feeds = load_feeds(calibration).bind(loaded.proto).check_first()
        return cls(feeds, loaded.base_dir, progress, keep_states=keep_states)

    def statistics(self, model: onnx.ModelProto, request: StatisticsRequest) -> Statistics:
        if self.data is None:
            raise UsageError("this pass needs calibration data; give --calib DIR (or calibration=...)")
        names = request.names()
        if not names:
            return Statistics({}, {"samples": 0})
        state = model_state(model)
        for key, _, answer in self._answers:
            if key == state and request.covered_by(answer):
                log.info("calibration statistics for %d tensors reused (same model state)", len(names))
                return Statistics(
                    {n: answer[n] for n in names}, answer.meta, {n: answer.values[n] for n in request.keep}
                )
        report = self.progress
        stats = collect_statistics(
            model,
            self.data,
            names,
            per_channel=request.per_channel,
            means=request.means,
            grams=request.grams,
            norms=request.norms,
            keep=request.keep,
            keep_samples=request.keep_samples,
            histograms=sorted(request.histograms),
            base_dir=self.base_dir,
            progress=(lambda done, total: report("calibration", done, total)) if report else None,
        )
        stats.meta["samples_kept"] = min(request.keep_samples, stats.meta.get("samples", 0)) if request.keep else 0
        self.runs += 1
        # Only answers about the latest keep_states model states are kept: a pass that changed the graph made
        # the others stale, and Gram matrices can take a lot of memory.
        others = list(dict.fromkeys(a[0] for a in self._answers if a[0] != state))  # oldest first
        kept = {state, *others[max(0, len(others) - (self.keep_states - 1)) :]} if self.keep_states > 1 else {state}
        self._answers = [a for a in self._answers if a[0] in kept] + [(state, request, stats)]
        return stats
