"""Measure what new weights for a few layers do to the model's outputs, one swap at a time.

The per-layer allocations of pruning and weight sharing both ask "this layer at that level, alone (or this plan
for all of them): how far are the outputs now?". ``WeightProbe`` holds the pass's graph as one stand-alone model
and a ``SensitivityEngine`` over the calibration data, swaps the given weights into that model's initializers for
one measurement and restores them after, so no copy of the model is made per probe.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph import iter_graphs
from .gs_bridge import export_standalone
from .sensitivity import SensitivityEngine

__all__ = ["WeightProbe"]


class WeightProbe:
    """``layers``: objects with ``.source`` (a ``graph_edit.ConstantSource``); only those whose weight is an
    initializer of the stand-alone model can be probed (``measured``: the ``max_layers`` largest when > 0)."""

    def __init__(self, ctx, layers: list, criterion, samples: int, max_layers: int = 0):
        self.base = export_standalone(ctx.graph, ctx.opset)
        self._tensors = {t.name: t for g in iter_graphs(self.base.graph) for t in g.initializer}
        measured = [x for x in layers if x.source.node is None and x.source.constant.name in self._tensors]
        if max_layers and len(measured) > max_layers:  # the largest layers hold most of what is to place
            keep = {id(x) for x in sorted(measured, key=lambda x: -self.size(x))[:max_layers]}
            measured = [x for x in measured if id(x) in keep]
        self.measured = measured
        self._ctx, self._criterion, self._samples = ctx, criterion, samples
        self._engine: SensitivityEngine | None = None

    @staticmethod
    def size(layer) -> int:
        return int(np.prod(layer.source.constant.shape))

    @property
    def engine(self) -> SensitivityEngine:
        """Built on first use (it runs the reference on the calibration samples once)."""
        if self._engine is None:
            # onnxruntime's own optimizations on: they change no float semantics here, and the probes run faster
            self._engine = SensitivityEngine(
                self.base,
                self._ctx.calibration,
                samples=self._samples,
                modes=(True,),
                criterion=self._criterion,
                progress=self._ctx.progress,
            )
        return self._engine

    def score(self, weights: Mapping[int, np.ndarray]) -> float:
        """The engine's score (1 = unchanged decisions) with ``weights`` (id(layer) -> array) in place."""
        engine = self.engine  # its reference runs on the model as it is, before any swap
        saved = []
        try:
            for layer in self.measured:
                if id(layer) not in weights:
                    continue
                proto = self._tensors[layer.source.constant.name]
                keep = onnx.TensorProto()
                keep.CopyFrom(proto)
                saved.append((proto, keep))
                dtype = helper.tensor_dtype_to_np_dtype(keep.data_type)
                proto.CopyFrom(numpy_helper.from_array(np.asarray(weights[id(layer)]).astype(dtype), proto.name))
            return engine.measure(self.base).score
        finally:
            for proto, keep in saved:
                proto.CopyFrom(keep)
