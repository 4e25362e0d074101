"""Task metrics on model outputs, shared by the parity check and the automatic search: a user's metric
``script.py:function(reference, candidate, samples)``, and accuracy against the data's ``__label__``."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from .data import LABEL_KEY, Sample, load_function
from .errors import BadInputError, UsageError

__all__ = ["load_metric", "find_label_output", "accuracy", "user_metric"]


def load_metric(spec: str | Callable | None) -> Callable | None:
    if spec is None or callable(spec):
        return spec
    return load_function(spec, "metric", "(reference, candidate, samples)")


def find_label_output(
    names: list[str], outs: list[dict[str, np.ndarray]], samples: list[Sample], chosen: str | None
) -> str | None:
    if chosen:
        if chosen not in names:
            raise UsageError(f"label output '{chosen}' is not an output (outputs: {', '.join(names)})")
        return chosen
    labels = samples[0].meta.get(LABEL_KEY)
    if labels is None or not outs:
        return None
    first = outs[0]
    for n in names:  # an integer label output of the labels' shape
        if first[n].dtype.kind in "iu" and first[n].shape == labels.shape:
            return n
    for n in names:  # logits [batch, classes]
        if first[n].dtype.kind == "f" and first[n].ndim == 2 and first[n].shape[0] == labels.reshape(-1).shape[0]:
            return n
    return None


def accuracy(outs: list[dict[str, np.ndarray]], samples: list[Sample], name: str) -> float:
    hits = total = 0
    for o, s in zip(outs, samples):
        y = s.meta[LABEL_KEY].reshape(-1)
        v = o[name]
        pred = np.argmax(v, axis=1) if v.dtype.kind == "f" and v.ndim == 2 else v.reshape(-1)
        hits += int(np.sum(pred == y))
        total += y.size
    return hits / total if total else float("nan")


def user_metric(fn: Callable, ref: list[dict], cand: list[dict], samples: list[Sample]) -> dict:
    try:
        value = fn(ref, cand, [{**s.feeds, **s.meta} for s in samples])
    except Exception as e:
        raise BadInputError(f"the user metric raised {type(e).__name__}: {e}") from e
    if isinstance(value, Mapping):
        return {str(k): float(v) for k, v in value.items()}
    return {"value": float(value)}
