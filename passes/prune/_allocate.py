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
import onnx
from onnx import numpy_helper

from onnxslim.graph import iter_graphs
from onnxslim.gs_bridge import export_standalone
from onnxslim.sensitivity import SensitivityEngine, greedy_levels

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
    base = export_standalone(ctx.graph, ctx.opset)
    tensors = {t.name: t for g in iter_graphs(base.graph) for t in g.initializer}
    # onnxruntime's own optimizations on: they change no float semantics here, and the probes run faster
    engine = SensitivityEngine(
        base, ctx.calibration, samples=samples, modes=(True,), criterion=criterion, progress=ctx.progress
    )
    levels = sensitivity_levels(target)
    measured = [x for x in layers if x.source.node is None and x.source.constant.name in tensors]
    if max_layers and len(measured) > max_layers:  # the largest layers hold most of the zeros to place
        size = lambda x: int(np.prod(x.source.constant.shape))
        keep = {id(x) for x in sorted(measured, key=lambda x: -size(x))[:max_layers]}
        measured = [x for x in measured if id(x) in keep]
    losses: dict[int, list[float]] = {}
    for layer in measured:
        proto = tensors[layer.source.constant.name]
        original = onnx.TensorProto()
        original.CopyFrom(proto)
        curve = [0.0]
        for v in levels[1:]:
            w = prune_at(layer, v)
            proto.CopyFrom(numpy_helper.from_array(w.astype(numpy_helper.to_array(original).dtype), proto.name))
            curve.append(max(curve[-1], engine.measure(base).loss))  # a deeper cut never helps: noise clamped
            proto.CopyFrom(original)
        losses[id(layer)] = curve
    # Greedy: the cheapest loss per zeroed weight first, until the uniform target's zeros are reached.
    params = {id(x): int(np.prod(x.source.constant.shape)) for x in measured}
    gains = {k: [params[k] * v for v in levels] for k in losses}
    state = greedy_levels(losses, gains, target * sum(params.values()))
    chosen = {k: levels[i] for k, i in state.items()}
    at_target = levels.index(round(target, 4))
    # Verify: the allocated model against the uniform one, both measured; keep the better.
    scores = {}
    for name, plan in (("uniform", {k: target for k in chosen}), ("allocated", chosen)):
        saved = []
        for layer in measured:
            proto = tensors[layer.source.constant.name]
            keep = onnx.TensorProto()
            keep.CopyFrom(proto)
            saved.append((proto, keep))
            if plan[id(layer)] > 0:
                dtype = numpy_helper.to_array(keep).dtype
                proto.CopyFrom(numpy_helper.from_array(prune_at(layer, plan[id(layer)]).astype(dtype), proto.name))
        scores[name] = engine.measure(base).score
        for proto, keep in saved:
            proto.CopyFrom(keep)
    pick = "allocated" if scores["allocated"] >= scores["uniform"] else "uniform"
    if pick == "uniform":
        chosen = {k: target for k in chosen}
    notes.append(
        f"sensitivity allocation: {len(measured)} of {len(layers)} layers x {len(levels) - 1} levels measured in "
        f"{time.perf_counter() - t0:.1f}s on {len(engine.feeds)} calibration samples; score allocated "
        f"{scores['allocated']:.4f} vs uniform {scores['uniform']:.4f}: kept {pick}"
    )
    return {k: (chosen[k], losses[k][at_target]) for k in chosen}
