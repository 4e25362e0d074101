"""Private helper of prune_by_magnitude: spread one sparsity target over the layers by measured sensitivity.

Each layer is pruned alone at a few levels around the target and the shared sensitivity engine measures what that
does to the model's outputs on calibration data, as the task sees it (``criterion``: the worst output / channel
cosine and top-1 agreement by default, or a user's ``script.py:function``). A greedy allocation then raises, step
by step, the layer whose next level costs the least loss per zeroed weight, until the layers hold as many zeros
as the uniform target would (the losses of layers are taken as additive: the usual first-order assumption). The
allocated model and the uniform one are both measured, and the better one is kept, so the search never does worse
than the uniform target on the calibration data.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np

from onnxslim.sensitivity import greedy_levels
from onnxslim.weight_probe import WeightProbe

__all__ = ["sensitivity_levels", "allocate_sparsity"]

log = logging.getLogger(__name__)


def sensitivity_levels(target: float) -> list[float]:
    """Levels each layer is tried at: dense, half the target, the target, and two steps towards 0.95."""
    top = 0.95
    levels = {0.0, round(target / 2, 4), round(target, 4)}
    levels |= {round(target + (top - target) * f, 4) for f in (1 / 3, 2 / 3)} if target < top else set()
    return sorted(v for v in levels if 0 <= v < 1)


def allocate_sparsity(
    ctx,
    layers: list,
    target: float,
    prune_at: Callable[[object, float], np.ndarray],
    criterion,
    samples: int,
    notes: list[str],
    max_layers: int = 0,
) -> dict[int, tuple[float, float]]:
    """id(layer) -> (its sparsity, its measured loss at the target), for the layers that could be measured (weights
    in initializers; the ``max_layers`` largest when > 0); the others keep ``target``."""
    t0 = time.perf_counter()
    probe = WeightProbe(ctx, layers, criterion, samples, max_layers)
    measured = probe.measured
    levels = sensitivity_levels(target)
    losses: dict[int, list[float]] = {}
    for layer in measured:
        curve = [0.0]
        for v in levels[1:]:  # a deeper cut never helps: noise clamped
            curve.append(max(curve[-1], 1.0 - probe.score({id(layer): prune_at(layer, v)})))
        losses[id(layer)] = curve
    # Greedy: the cheapest loss per zeroed weight first, until the uniform target's zeros are reached.
    params = {id(x): probe.size(x) for x in measured}
    gains = {k: [params[k] * v for v in levels] for k in losses}
    state = greedy_levels(losses, gains, target * sum(params.values()))
    chosen = {k: levels[i] for k, i in state.items()}
    at_target = levels.index(round(target, 4))
    # Verify: the allocated model against the uniform one, both measured; keep the better.
    scores = {}
    for name, plan in (("uniform", {k: target for k in chosen}), ("allocated", chosen)):
        scores[name] = probe.score({id(x): prune_at(x, plan[id(x)]) for x in measured if plan[id(x)] > 0})
    pick = "allocated" if scores["allocated"] >= scores["uniform"] else "uniform"
    if pick == "uniform":
        chosen = {k: target for k in chosen}
    notes.append(
        f"sensitivity allocation: {len(measured)} of {len(layers)} layers x {len(levels) - 1} levels measured in "
        f"{time.perf_counter() - t0:.1f}s on {len(probe.engine.feeds)} calibration samples; score allocated "
        f"{scores['allocated']:.4f} vs uniform {scores['uniform']:.4f}: kept {pick}"
    )
    return {k: (chosen[k], losses[k][at_target]) for k in chosen}
