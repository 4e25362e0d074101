"""One sensitivity engine: what a candidate change to one layer (or a set of layers) does to the model's outputs.

The quantizer's precision search asks it today; pruning, weight sharing and the automatic search ask it the same
way. The engine runs the reference model once per mode on the first ``samples`` calibration feeds and keeps
those outputs (memory: ``samples`` x the outputs' size, whatever the data's length); each ``measure(candidate)``
runs the candidate on the same feeds, in one onnxruntime thread (deterministic sums), and compares with the
parity metrics (cosine over all samples at once, SNR, max abs error), worst over outputs and modes.

Criteria (``criterion``): ``"cosine"`` scores a candidate by its worst output cosine; ``"decisions"`` by what the
task sees, the worst of each float output's cosine, its worst channel's cosine (axis 1: the box rows and the
score rows of one detector tensor are judged apart, where one cosine over the whole tensor is dominated by the
large values) and, for class scores ([batch, classes]), its top-1 agreement; or a callable
``metric(reference_outputs, candidate_outputs) -> float`` (per sample, a dict of output name -> array; 1.0 = the
same decisions), e.g. a user's ``script.py:function``. ``Damage.score`` is that value, ``loss`` is 1 - score.

Modes: ``False`` runs the model as ONNX defines it (onnxruntime's graph optimizations off), ``True`` as
onnxruntime runs it by default; a candidate is judged by the worse of the two, since onnxruntime's own fusions
can change what a rewrite means (DQ -> MatMul becomes MatMulNBits, which re-quantizes its input). Integer
outputs (labels) follow from the float ones and are not scored.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import onnx

from .parity_metrics import SNR_CAP_DB, compare_output, cosine_similarity, snr_db

__all__ = ["Damage", "SensitivityEngine", "decisions_score", "resolve_criterion", "check_criterion", "greedy_levels"]

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)


@dataclass
class Damage:
    """How far a candidate's outputs are from the reference: worst over outputs and modes."""

    cosine: float = 1.0
    score: float = 1.0  # the engine's criterion (1 = unchanged decisions)
    snr_db: float = SNR_CAP_DB
    max_abs: float = 0.0
    outputs: dict[str, dict[str, float]] = field(default_factory=dict)  # per output: its worst metrics

    @property
    def loss(self) -> float:
        """1 - score: the ranking key (0 = unchanged)."""
        return 1.0 - self.score

    def to_dict(self) -> dict:
        return {
            "score": self.score,
            "cosine": self.cosine,
            "snr_db": self.snr_db,
            "max_abs": self.max_abs,
            "outputs": self.outputs,
        }


def check_criterion(text: str, option: str) -> str | None:
    """The problem with a criterion option's value (for ``Options.validate``), or None."""
    if text in ("cosine", "decisions") or ":" in text:
        return None
    return f"{option} must be cosine, decisions or script.py:function; got {text!r}"


def resolve_criterion(text: str):
    """An option's criterion as the engine takes it: ``cosine`` / ``decisions``, or the loaded
    ``script.py:function(reference, candidate) -> agreement``."""
    if text in ("cosine", "decisions"):
        return text
    from .data import load_function

    return load_function(text, "metric", "(reference, candidate) -> float")


def decisions_score(reference: list[dict], candidate: list[dict]) -> float:
    """The ``decisions`` criterion on per-sample outputs (output name -> array): the worst over float outputs of
    the cosine, the worst channel's cosine and top-1 agreement. Continuous where a task metric on a few samples
    is not: a change that flips no decision still scores by how close its outputs stay."""
    score = 1.0
    for name in reference[0] if reference else ():
        ref = [np.asarray(r[name]) for r in reference]
        if ref[0].dtype.kind != "f":
            continue
        got = [np.asarray(c[name]) for c in candidate]
        flat = np.concatenate([a.reshape(-1) for a in ref]).astype(np.float64)
        cand = np.concatenate([a.reshape(-1) for a in got]).astype(np.float64)
        score = min(score, float(cosine_similarity(flat, cand)))
        decided = compare_output(name, ref, got, [""] * len(got))["metrics"]
        for key in ("worst_channel_cosine", "top1_agreement"):
            if key in decided:
                score = min(score, float(decided[key]))
    return score


def _inputs_only(feed: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in feed.items() if not str(k).startswith("__")}


class SensitivityEngine:
    """Scores candidate models against a reference on calibration data (see the module docstring)."""

    def __init__(
        self,
        reference: onnx.ModelProto,
        data: Iterable[Mapping[str, Any]],
        *,
        samples: int = 16,
        modes: tuple[bool, ...] = (False, True),
        threads: int = 1,
        criterion: str | Callable[[list[dict], list[dict]], float] = "cosine",
        progress: Callable[[str, int, int | None], None] | None = None,
        stage: str = "sensitivity probes",
    ):
        if samples < 1:
            raise ValueError(f"samples must be >= 1; got {samples}")
        if not callable(criterion) and criterion not in ("cosine", "decisions"):
            raise ValueError(f"criterion must be 'cosine', 'decisions' or a callable; got {criterion!r}")
        self.modes, self.threads, self.criterion = tuple(modes), threads, criterion
        self.sessions = 0
        self.progress, self.stage = progress, stage
        self.measured, self.expected = 0, None  # candidates scored so far; how many the current probe() will score
        self.feeds: list[dict[str, np.ndarray]] = []
        for feed in data:
            self.feeds.append(_inputs_only(feed))
            if len(self.feeds) >= samples:
                break
        self.outputs = [o.name for o in reference.graph.output]
        # One reference per mode: onnxruntime's fusions of the reference itself are not the candidate's doing.
        self.reference = {mode: self._run(reference, mode) for mode in self.modes}

    def _run(self, model: onnx.ModelProto, optimize: bool) -> dict[str, list[np.ndarray]]:
        from .runtime import make_session

        sess = make_session(model, optimize=optimize, threads=self.threads).session
        self.sessions += 1
        outs: dict[str, list[np.ndarray]] = {n: [] for n in self.outputs}
        for f in self.feeds:
            for n, v in zip(self.outputs, sess.run(self.outputs, f)):
                outs[n].append(np.asarray(v))
        return outs

    def _per_sample(self, outs: dict[str, list[np.ndarray]]) -> list[dict[str, np.ndarray]]:
        return [{n: outs[n][i] for n in self.outputs} for i in range(len(self.feeds))]

    def measure(self, candidate: onnx.ModelProto) -> Damage:
        """The candidate's outputs against the reference's, worst over outputs and modes."""
        damage = Damage()
        for mode in self.modes:
            got, reference = self._run(candidate, mode), self.reference[mode]
            if callable(self.criterion):
                agreed = float(self.criterion(self._per_sample(reference), self._per_sample(got)))
                damage.score = min(damage.score, agreed)
            for n in self.outputs:
                if reference[n][0].dtype.kind != "f":
                    continue
                ref = np.concatenate([a.reshape(-1) for a in reference[n]]).astype(np.float64)
                cand = np.concatenate([a.reshape(-1) for a in got[n]]).astype(np.float64)
                m = {
                    "cosine": float(cosine_similarity(ref, cand)),
                    "snr_db": float(snr_db(ref, cand - ref)),
                    "max_abs": float(np.abs(cand - ref).max(initial=0.0)),
                }
                worst = damage.outputs.setdefault(n, dict(m))
                worst.update(
                    cosine=min(worst["cosine"], m["cosine"]),
                    snr_db=min(worst["snr_db"], m["snr_db"]),
                    max_abs=max(worst["max_abs"], m["max_abs"]),
                )
                if self.criterion == "decisions":
                    decided = compare_output(n, reference[n], got[n], [""] * len(got[n]))["metrics"]
                    for key in ("worst_channel_cosine", "top1_agreement"):
                        if key in decided:
                            m[key] = float(decided[key])
                            worst[key] = min(worst.get(key, 1.0), m[key])
                    damage.score = min(
                        damage.score, m["cosine"], m.get("worst_channel_cosine", 1.0), m.get("top1_agreement", 1.0)
                    )
                elif self.criterion == "cosine":
                    damage.score = min(damage.score, m["cosine"])
                damage.cosine = min(damage.cosine, m["cosine"])
                damage.snr_db = min(damage.snr_db, m["snr_db"])
                damage.max_abs = max(damage.max_abs, m["max_abs"])
        self.measured += 1
        if self.progress is not None:
            self.progress(self.stage, self.measured, self.expected)
        return damage

    def probe(
        self,
        keys: Iterable[K],
        build: Callable[[K], onnx.ModelProto],
        on_result: Callable[[K, Damage], None] | None = None,
    ) -> dict[K, Damage]:
        """Each change alone: ``build(key)`` is the model with only that change applied; its damage, by key."""
        out: dict[K, Damage] = {}
        keys = list(keys)
        self.expected = self.measured + len(keys)
        for key in keys:
            out[key] = self.measure(build(key))
            if on_result is not None:
                on_result(key, out[key])
        return out

    @staticmethod
    def ranked(damages: Mapping[K, Damage]) -> list[K]:
        """Keys from the most to the least damaging (ties keep their order)."""
        return sorted(damages, key=lambda k: -damages[k].loss)


def greedy_levels(
    losses: Mapping[K, list[float]], gains: Mapping[K, list[float]], need: float, max_loss: float | None = None
) -> dict[K, int]:
    """Per key, the index of its chosen level. Every key starts at level 0; the key whose next level costs the
    least loss per unit gained moves up, until the total gain reaches ``need`` or no key can move. ``gains[k][i]``
    is what level i gains (increasing, ``gains[k][0] == 0``: zeros placed, bits saved); ``losses[k][i]`` what it
    costs, measured with that key's change alone (losses are taken as additive: the usual first-order view).
    ``max_loss``: also stop before a move that would take the summed loss past it (an accuracy budget)."""
    state = {k: 0 for k in losses}
    total = 0.0
    spent = sum(losses[k][0] for k in losses)
    while total < need - 1e-9:
        best, best_key = None, None
        for k, i in state.items():
            if i + 1 >= len(losses[k]):
                continue
            step = gains[k][i + 1] - gains[k][i]
            if step <= 0:
                continue
            key = ((losses[k][i + 1] - losses[k][i]) / step, -step)
            if best_key is None or key < best_key:
                best, best_key = k, key
        if best is None:
            break
        extra = losses[best][state[best] + 1] - losses[best][state[best]]
        if max_loss is not None and spent + extra > max_loss:
            break
        spent += extra
        total += gains[best][state[best] + 1] - gains[best][state[best]]
        state[best] += 1
    return state
