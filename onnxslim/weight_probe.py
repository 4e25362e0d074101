"""Measure what new weights for a few layers do to the model's outputs, one swap at a time.

The per-layer allocations of pruning and weight sharing both ask "this layer at that level, alone (or this plan
for all of them): how far are the outputs now?". ``WeightProbe`` holds the pass's graph as one stand-alone model
and a ``SensitivityEngine`` over the calibration data, swaps the given weights into that model's initializers for
one measurement and restores them after, so no copy of the model is made per probe.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph import iter_graphs
from .gs_bridge import export_standalone
from .sensitivity import SensitivityEngine

__all__ = ["WeightProbe", "swapped_initializers"]


class WeightProbe:
    """``layers``: objects with ``.source`` (a ``graph_edit.ConstantSource``); only those whose weight is an
    initializer of the stand-alone model can be probed (``measured``: the ``max_layers`` largest when > 0)."""

    def __init__(self, ctx, layers: list, criterion, samples: int, max_layers: int = 0):
        self.base = export_standalone(ctx.graph, ctx.opset)
        if getattr(ctx, "base_dir", None) is not None:
            # Sessions are made from this proto (bytes), and onnxruntime resolves external weights of a model
            # given as bytes against the working folder: read them in (the probes swap weights in memory anyway).
            from onnx.external_data_helper import load_external_data_for_model, uses_external_data

            if any(uses_external_data(t) for g in iter_graphs(self.base.graph) for t in g.initializer):
                load_external_data_for_model(self.base, str(ctx.base_dir))
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
        named = {x.source.constant.name: weights[id(x)] for x in self.measured if id(x) in weights}
        with swapped_initializers(self.base, named, self._tensors):
            return engine.measure(self.base).score


@contextmanager
def swapped_initializers(
    model: onnx.ModelProto, values: Mapping[str, np.ndarray], tensors: Mapping[str, onnx.TensorProto] | None = None
) -> Iterator[onnx.ModelProto]:
    """``model`` with the named initializers (any subgraph) holding ``values`` (cast to their dtype) for the
    duration of the block, restored after: one model, no copy per measurement. ``tensors``: the name -> proto
    index when the caller keeps one."""
    if tensors is None:
        tensors = {t.name: t for g in iter_graphs(model.graph) for t in g.initializer}
    saved = []
    try:
        for name, value in values.items():
            proto = tensors[name]
            keep = onnx.TensorProto()
            keep.CopyFrom(proto)
            saved.append((proto, keep))
            dtype = helper.tensor_dtype_to_np_dtype(keep.data_type)
            proto.CopyFrom(numpy_helper.from_array(np.asarray(value).astype(dtype), proto.name))
        yield model
    finally:
        for proto, keep in saved:
            proto.CopyFrom(keep)
