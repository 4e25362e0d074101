"""The search's arithmetic, apart from running anything: a greedy path over per-layer levels, the candidates
taken from it, the budget bisection, and the Pareto front of what was measured."""

from __future__ import annotations

import math
from collections.abc import Mapping

__all__ = ["greedy_path", "checkpoints", "pareto_front", "Objective"]


def greedy_path(
    losses: Mapping[str, Mapping[str, float]], gains: Mapping[str, Mapping[str, float]], order: list[str]
) -> list[dict[str, str]]:
    """Configurations from every layer at ``float`` to every layer at its most compressed available level, one
    move at a time: the move (a layer to any further level of ``order``, skipping unavailable ones) with the
    least estimated loss per byte saved goes first. ``path[k]`` is the configuration after k moves (level names;
    ``float`` omitted). Losses are taken as additive, the usual first-order view; EVAL decides."""
    state = {x: "float" for x in losses}
    rank = {lv: i for i, lv in enumerate(["float", *order])}
    path = [{}]
    while True:
        best, best_key = None, None
        for x, cur in state.items():
            here_loss = 0.0 if cur == "float" else losses[x][cur]
            here_gain = 0.0 if cur == "float" else gains[x][cur]
            for lv in order:
                if rank[lv] <= rank[cur] or not math.isfinite(losses[x].get(lv, math.inf)):
                    continue
                step = gains[x][lv] - here_gain
                if step <= 0:
                    continue
                key = ((losses[x][lv] - here_loss) / step, -step, x, lv)
                if best_key is None or key < best_key:
                    best, best_key = (x, lv), key
        if best is None:
            return path
        state[best[0]] = best[1]
        path.append({x: lv for x, lv in state.items() if lv != "float"})


def path_losses(path: list[dict[str, str]], losses: Mapping[str, Mapping[str, float]]) -> list[float]:
    return [sum(losses[x][lv] for x, lv in cfg.items()) for cfg in path]


def checkpoints(spent: list[float], budget: float, factors=(0.25, 0.5, 1.0, 2.0, 4.0, 8.0)) -> list[int]:
    """Path indices to verify first: the last configuration whose estimated loss stays within each multiple of
    the budget, and the end of the path (the estimate and EVAL's metric need not agree in scale)."""
    out = []
    for f in factors:
        inside = [k for k, s in enumerate(spent) if s <= f * max(budget, 1e-6) and k > 0]
        if inside:
            out.append(inside[-1])
    if len(spent) > 1:
        out.append(len(spent) - 1)
    return sorted(set(out))


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (cost, drop) no other point beats on both (lower is better on each)."""
    front = []
    for i, (c, d) in enumerate(points):
        beaten = any((c2 <= c and d2 <= d) and (c2 < c or d2 < d) for j, (c2, d2) in enumerate(points) if j != i)
        if not beaten:
            front.append(i)
    return front


class Objective:
    """``size`` (file bytes), ``latency`` (onnxruntime CPU, 1 thread) or a mix ``size:0.7,latency:0.3``:
    the weighted sum of each candidate's ratios to the base model."""

    def __init__(self, text: str = "size"):
        self.text = text
        weights: dict[str, float] = {}
        for part in (p.strip() for p in text.split(",") if p.strip()):
            name, _, w = part.partition(":")
            if name not in ("size", "latency"):
                raise ValueError(f"objective {text!r}: terms are size and latency (e.g. size:0.7,latency:0.3)")
            try:
                weights[name] = float(w) if w else 1.0
            except ValueError as e:
                raise ValueError(f"objective {text!r}: {w!r} is not a number") from e
        if not weights or any(v < 0 for v in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"objective {text!r}: give size, latency, or positive weights")
        self.weights = weights

    @property
    def needs_latency(self) -> bool:
        return self.weights.get("latency", 0) > 0

    def value(self, size_ratio: float, latency_ratio: float | None) -> float:
        total = self.weights.get("size", 0.0) * size_ratio
        if self.needs_latency:
            total += self.weights["latency"] * (latency_ratio if latency_ratio is not None else math.inf)
        return total
