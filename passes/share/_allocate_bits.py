"""Private helper of share_weights: spread one bit budget over the layers by measured sensitivity.

The ``max_layers`` largest layers are each shared alone at a few bit widths around the target and the shared
sensitivity engine measures what that does to the model's outputs on calibration data, as the task sees it
(``criterion``). A greedy allocation (``onnxslim.sensitivity.greedy_levels``) then lowers, step by step, the layer
whose next width costs the least loss per index bit saved, until the layers use as many index bits as the
uniform width would: the same file size, spent where it matters. The allocated model and the uniform one are both
measured and the better one is kept, so the search never does worse than uniform on the calibration data.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from onnxslim.sensitivity import greedy_levels
from onnxslim.weight_probe import WeightProbe

__all__ = ["bit_levels", "allocate_bits"]

TOP_BITS = 8


def bit_levels(target: int) -> list[int]:
    """Widths each layer is tried at, widest first: 8 (taken as lossless), two above the target, the target, one
    below (never under 2)."""
    return sorted({TOP_BITS, min(TOP_BITS, target + 2), min(TOP_BITS, target + 1), target, max(2, target - 1)})[::-1]


def allocate_bits(
    ctx,
    layers: list,
    target: int,
    shared_at: Callable[[object, int], np.ndarray],
    criterion,
    samples: int,
    notes: list[str],
    max_layers: int = 0,
    min_score: float = 0.0,
) -> dict[int, int]:
    """id(layer) -> bits for the layers that could be measured (weights in initializers; the ``max_layers``
    largest when > 0); the others keep ``target``. ``shared_at(layer, bits)`` is the layer's weight shared at
    that width (dense). ``min_score`` > 0: an accuracy floor instead of a size target: the fewest bits (down to
    ``target``) whose measured score stays at or above it, backing off the worst layers until it does."""
    t0 = time.perf_counter()
    probe = WeightProbe(ctx, layers, criterion, samples, max_layers)
    measured, size = probe.measured, probe.size
    levels = bit_levels(target) if not min_score else list(range(TOP_BITS, target - 1, -1))
    if not measured or len(levels) < 2:
        return {}

    def with_weights(plan: dict[int, int]) -> float:
        return probe.score({id(x): shared_at(x, plan[id(x)]) for x in measured if plan.get(id(x), TOP_BITS) < TOP_BITS})

    losses: dict[int, list[float]] = {}
    for layer in measured:
        curve = [0.0]
        for bits in levels[1:]:
            curve.append(max(curve[-1], 1.0 - with_weights({id(layer): bits})))  # fewer bits never help: noise
        losses[id(layer)] = curve
    gains = {id(x): [size(x) * (TOP_BITS - b) for b in levels] for x in measured}
    total = sum(size(x) for x in measured)
    if min_score:
        return _to_floor(probe, losses, gains, levels, min_score, with_weights, notes, t0)
    state = greedy_levels(losses, gains, total * (TOP_BITS - target))
    chosen = {k: levels[i] for k, i in state.items()}
    uniform = {id(x): target for x in measured}
    scores = {"uniform": with_weights(uniform), "allocated": with_weights(chosen)}
    pick = "allocated" if scores["allocated"] >= scores["uniform"] else "uniform"
    used = sum(size(x) * chosen[id(x)] for x in measured) / max(1, total)
    notes.append(
        f"sensitivity allocation: {len(measured)} of {len(layers)} layers x {len(levels) - 1} widths measured in "
        f"{time.perf_counter() - t0:.1f}s on {len(probe.engine.feeds)} calibration samples; allocated {used:.2f} bits "
        f"on average, score allocated {scores['allocated']:.4f} vs uniform {scores['uniform']:.4f}: kept {pick}"
    )
    return chosen if pick == "allocated" else uniform


def _to_floor(probe, losses, gains, levels, floor, with_weights, notes, t0) -> dict[int, int]:
    """The accuracy-floor allocation: greedy down to the predicted budget, then measured, backing off (one width
    up for the layer whose current width costs most) until the measured score holds the floor."""
    state = greedy_levels(losses, gains, float("inf"), max_loss=1.0 - floor)
    score = with_weights({k: levels[i] for k, i in state.items()})
    backed = 0
    while score < floor and any(state.values()):
        worst = max((k for k in state if state[k]), key=lambda k: losses[k][state[k]] - losses[k][state[k] - 1])
        state[worst] -= 1
        backed += 1
        score = with_weights({k: levels[i] for k, i in state.items()})
    chosen = {k: levels[i] for k, i in state.items()}
    measured = probe.measured
    used = sum(probe.size(x) * chosen[id(x)] for x in measured) / max(1, sum(probe.size(x) for x in measured))
    held = "holds" if score >= floor else "is missed even at 8 bits everywhere"
    notes.append(
        f"sensitivity allocation to score >= {floor:g}: {len(measured)} layers x {len(levels) - 1} widths measured "
        f"in {time.perf_counter() - t0:.1f}s on {len(probe.engine.feeds)} calibration samples; {used:.2f} bits on "
        f"average ({backed} back-off step(s)), measured score {score:.4f}: the floor {held}"
    )
    return chosen
