"""Private helper of prune_channels: a fraction per channel group from measured sensitivity.

Removing a group's channels is simulated exactly by zeroing the slices of the layers that read them (the "in"
edits: with every reader ignoring a channel, the network computes what the pruned one does, before recovery), so
each group is tried alone at a few fractions on one exported copy of the model, weights swapped in and out, and
the shared sensitivity engine scores the outputs on calibration data. A greedy allocation then takes, step by
step, the group whose next fraction costs the least loss per weight removed, until as many weights go as with
the uniform fraction; the allocated plan and the uniform one are both measured and the better is kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from onnxslim.graph import iter_graphs
from onnxslim.gs_bridge import export_standalone
from onnxslim.sensitivity import SensitivityEngine, greedy_levels

__all__ = ["channel_levels", "allocate_fractions"]


def channel_levels(target: float) -> list[float]:
    top = 0.9
    levels = {0.0, round(target / 2, 4), round(target, 4)}
    if target < top:
        levels.add(round(target + (top - target) / 2, 4))
    return sorted(levels)


def allocate_fractions(
    ctx,
    plan: list,
    choose: Callable[[object, float], dict[int, np.ndarray]],
    criterion,
    samples: int,
    notes: list[str],
    max_groups: int = 0,
) -> dict[int, float]:
    """id(group) -> fraction for the ``plan``'s (group, fraction) pairs whose readers' weights are initializers."""
    t0 = time.perf_counter()
    base = export_standalone(ctx.graph, ctx.opset)
    tensors = {t.name: t for g in iter_graphs(base.graph) for t in g.initializer}
    engine = SensitivityEngine(
        base, ctx.calibration, samples=samples, modes=(True,), criterion=criterion, progress=ctx.progress
    )

    def readers(group):
        out = []
        for e in group.edits:
            if e.role == "in":
                name = e.node.inputs[e.input].name
                if name not in tensors:
                    return None
                out.append((tensors[name], e))
        return out

    def zeroed(group, removed):
        """Swap in the group's readers with the removed channels zeroed; returns the originals to restore."""
        saved = []
        for proto, e in readers(group):
            r = removed.get(e.space)
            if r is None or not len(r):
                continue
            keep = onnx.TensorProto()
            keep.CopyFrom(proto)
            w = numpy_helper.to_array(keep).copy()
            index = [slice(None)] * w.ndim
            index[e.axis] = r
            w[tuple(index)] = 0
            proto.CopyFrom(numpy_helper.from_array(w, proto.name))
            saved.append((proto, keep))
        return saved

    def restore(saved):
        for proto, keep in reversed(saved):
            proto.CopyFrom(keep)

    def weights_removed(group, removed):
        n = 0
        for e in group.edits:
            r = removed.get(e.space)
            shape = e.node.inputs[e.input].shape if e.input < len(e.node.inputs) else None
            if r is not None and len(r) and shape:
                n += int(np.prod(shape)) // int(shape[e.axis]) * len(r)
        return n

    measured = [(g, f) for g, f in plan if readers(g)]
    if max_groups and len(measured) > max_groups:  # the largest groups hold most of the weights to remove
        size = {id(g): weights_removed(g, choose(g, f)) for g, f in measured}
        keep = {id(g) for g, _ in sorted(measured, key=lambda p: -size[id(p[0])])[:max_groups]}
        measured = [(g, f) for g, f in measured if id(g) in keep]
    curves: dict[int, list[tuple[float, float, int, dict]]] = {}  # id -> [(level, loss, weights removed, removed)]
    for g, f in measured:
        curve = [(0.0, 0.0, 0, {})]
        for level in channel_levels(f)[1:]:
            removed = choose(g, level)
            saved = zeroed(g, removed)
            loss = engine.measure(base).loss if saved else curve[-1][1]
            restore(saved)
            curve.append((level, max(loss, curve[-1][1]), weights_removed(g, removed), removed))
        curves[id(g)] = curve
    need = sum(weights_removed(g, choose(g, f)) for g, f in measured)
    losses = {k: [point[1] for point in c] for k, c in curves.items()}
    gains = {k: [point[2] for point in c] for k, c in curves.items()}
    state = greedy_levels(losses, gains, need)  # the least loss per removed weight first
    chosen = {id(g): curves[id(g)][state[id(g)]][0] for g, _ in measured}
    scores = {}
    for name, fractions in (("uniform", {id(g): f for g, f in measured}), ("allocated", chosen)):
        saved = []
        for g, _ in measured:
            if fractions[id(g)] > 0:
                saved += zeroed(g, choose(g, fractions[id(g)]))
        scores[name] = engine.measure(base).score
        restore(saved)
    pick = "allocated" if scores["allocated"] >= scores["uniform"] else "uniform"
    notes.append(
        f"sensitivity allocation: {len(measured)} of {len(plan)} groups measured in {time.perf_counter() - t0:.1f}s on "
        f"{len(engine.feeds)} calibration samples (before recovery); score allocated {scores['allocated']:.4f} vs "
        f"uniform {scores['uniform']:.4f}: kept {pick}"
    )
    return chosen if pick == "allocated" else {id(g): f for g, f in measured}
