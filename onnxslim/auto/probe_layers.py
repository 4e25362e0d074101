"""The sensitivity table of the automatic search: per layer, what each level alone does to the outputs.

For each level, the real pass(es) compress every layer at that level once (GPTQ rounding, compensated codes,
SparseGPT zeros, as users get them); constant folding then turns each layer's weight chain back into plain
values. Each layer's value is then swapped alone into the base model and the shared sensitivity engine scores
the outputs on calibration data (one onnxruntime session per probe, no model copies). A level a pass leaves a
layer out of (depthwise weights, too-small layers) is marked unavailable for it.

What a probe does not see: int8 rounding of *activations* (the weights are swapped, the activations stay
float), and how layers' errors add up; the search verifies every candidate it returns on EVAL for that reason.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ..sensitivity import SensitivityEngine
from ..weight_probe import swapped_initializers
from .levels import Level, WeightLayer, build_passes

__all__ = ["level_weights", "probe_layers"]


def _base_weights(base: str, layers: list[WeightLayer]) -> dict[str, np.ndarray]:
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    wanted = {x.weight for x in layers}
    out = {}
    for t in onnx.load(base, load_external_data=False).graph.initializer:
        if t.name in wanted:
            if uses_external_data(t):
                load_external_data_for_tensor(t, str(Path(base).parent))
            out[t.name] = numpy_helper.to_array(t)
    return out


def level_weights(
    base: str,
    layers: list[WeightLayer],
    level: Level,
    calibration,
    seed: int = 0,
    original: dict[str, np.ndarray] | None = None,
    statistics=None,
) -> dict[str, np.ndarray]:
    """Layer name -> its weight with every layer compressed at ``level`` (only the layers the passes changed).
    The weights are read by running the compressed model with each layer's weight input as an extra output
    (onnxruntime's rewrites off): whatever chain stores it (DequantizeLinear, Cast+Mul, codebook decoding,
    packed sparse values) yields exactly the values the layer computes with. ``statistics``: a
    ``CalibrationService`` shared by the levels (each compresses the same base model: its Grams are collected
    once)."""
    from onnx import helper

    from ..data import load_feeds
    from ..pipeline import optimize
    from ..runtime import make_session
    from ..weight_layout import WEIGHT_INPUT

    passes = build_passes({x.name: level for x in layers}, layers, seed=seed)
    model, _ = optimize(
        base,
        passes,
        calibration=calibration,
        seed=seed,
        on_pass_error="raise",
        fixed_point=False,
        statistics=statistics,
    )
    by_name = {n.name: n for n in model.graph.node}
    wanted: dict[str, str] = {}
    for x in layers:
        node = by_name.get(x.name)
        idx = WEIGHT_INPUT.get(node.op_type) if node is not None else None
        if idx is not None and len(node.input) > idx and node.input[idx]:
            wanted[x.name] = node.input[idx]
    inits = {t.name for t in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    for tensor in dict.fromkeys(wanted.values()):
        if tensor not in outputs:
            model.graph.output.append(helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
    values: dict[str, np.ndarray] = {}
    computed = [t for t in dict.fromkeys(wanted.values()) if t not in inits]
    if computed:
        feed = next(iter(load_feeds(calibration).bind(model)))
        sess = make_session(model, optimize=False, threads=1).session
        values = dict(zip(computed, sess.run(computed, feed)))
    for t in model.graph.initializer:
        if t.name in wanted.values():
            values[t.name] = numpy_helper.to_array(t)
    if original is None:
        original = _base_weights(base, layers)
    out = {}
    for x in layers:
        value = values.get(wanted.get(x.name, ""))
        before = original.get(x.weight)
        if value is None or before is None or value.shape != before.shape or np.array_equal(value, before):
            continue  # the pass left this layer as it was at this level
        out[x.name] = np.asarray(value, dtype=np.float32)
    return out


def probe_layers(
    base: str,
    layers: list[WeightLayer],
    levels: list[Level],
    calibration,
    *,
    samples: int = 8,
    criterion="decisions",
    seed: int = 0,
    progress: Callable[[str, int, int | None], None] | None = None,
    threads: int = 1,
) -> dict[str, dict[str, float]]:
    """``{layer: {level: loss}}``, loss = 1 - the engine's score with that layer alone at that level (``inf``:
    the level does not apply to the layer). ``threads``: onnxruntime threads of each probe's session."""
    from ..data import load_feeds
    from ..graph import load_model

    loaded = load_model(base)
    model = loaded.proto
    engine = SensitivityEngine(
        model,
        load_feeds(calibration).bind(model),
        samples=samples,
        modes=(True,),
        criterion=criterion,
        threads=threads,
        progress=progress,
        stage="auto: probes",
    )
    from ..calibration_service import CalibrationService

    weights, original = {}, _base_weights(base, layers)  # read once, compared with every level
    service = CalibrationService.for_model(loaded, calibration, keep_states=2)
    for i, level in enumerate(levels):
        if progress:
            progress(f"auto: compress every layer at {level.name}", i, len(levels))
        weights[level.name] = level_weights(base, layers, level, calibration, seed, original, service)
    table: dict[str, dict[str, float]] = {x.name: {} for x in layers}
    engine.expected = sum(len(w) for w in weights.values())
    for level in levels:
        for x in layers:
            value = weights[level.name].get(x.name)
            if value is None:
                table[x.name][level.name] = math.inf
                continue
            with swapped_initializers(model, {x.weight: value}):
                table[x.name][level.name] = max(0.0, engine.measure(model).loss)
    return table
