"""Private helper of distill_layers: run teacher and student side by side and reduce each layer's rows to moments.

For one layer and one calibration sample, the rows are the layer's input features ``x`` (Conv: its input patches,
``ConvPatches``) with the matching rows of the teacher's output ``y_t`` and of the student's own output ``y_s``.
Each fold of samples keeps (float64, fixed size, nothing of the sample itself):

- ``a = sum [x, 1]^T [x, 1]`` and ``g = sum [x, 1]^T y_t`` (the normal equations of ``y_t ~ W x + b``), only
  where the weights may be refit;
- per output channel: ``yy = sum y_t^2``, ``dsum = sum (y_t - y_s)``, ``dsq = sum (y_t - y_s)^2`` (the measured
  error of the student as it is, and the bias-only refit).

Samples alternate between two folds (even, odd) so a refit fitted on one can be judged on the other.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx

from onnxslim.calibration_graph import expose_tensors
from onnxslim.errors import BadInputError
from onnxslim.graph import iter_graphs
from onnxslim.runtime import make_session

from ._layers import Layer

__all__ = ["Runner", "Moments", "accumulate"]

_CHUNK = 1 << 20  # feature values per block of rows (bounded float64 temporaries)


class Runner:
    """An onnxruntime session (graph optimizations off, so every name exists) of ``model`` that also outputs
    ``names``; external weights are handed over memory-mapped from ``base_dir``."""

    def __init__(self, model: onnx.ModelProto, base_dir: Path | None, names: list[str], what: str):
        exposed, self.routes = expose_tensors(model, list(dict.fromkeys(names)))
        _keep_only(exposed, {r.output for r in self.routes.values()})
        self.what = what
        files = _external_files(exposed, base_dir)
        self.session = make_session(exposed, "cpu", optimize=False, external_files=files).session

    def run(self, feeds: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        names = list(dict.fromkeys(names))
        try:
            values = self.session.run([self.routes[n].output for n in names], feeds)
        except Exception as e:
            raise BadInputError(f"the {self.what} failed on a calibration sample: {str(e).splitlines()[0]}") from e
        return dict(zip(names, values))


def _keep_only(model: onnx.ModelProto, outputs: set[str]) -> None:
    """Cut the main graph down to what ``outputs`` need: onnxruntime runs every node whatever is fetched, and a
    wave's tensors early in the model need only the layers before them."""
    g = model.graph
    needed, keep = set(outputs), []
    for n in reversed(g.node):
        if not any(o in needed for o in n.output):
            continue
        keep.append(n)
        needed.update(n.input)
        for a in n.attribute:  # a body may read outer tensors: keep whatever any of its nodes names
            for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                needed.update(i for sg in iter_graphs(sub) for x in sg.node for i in x.input)
    kept_outputs = [o for o in g.output if o.name in outputs]
    del g.node[:]
    g.node.extend(reversed(keep))
    del g.output[:]
    g.output.extend(kept_outputs)
    inits = [t for t in g.initializer if t.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)


def _external_files(model: onnx.ModelProto, base_dir: Path | None) -> dict[str, np.memmap] | None:
    locations = {
        e.value
        for g in iter_graphs(model.graph)
        for t in g.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL
        for e in t.external_data
        if e.key == "location"
    }
    if not locations:
        return None
    if base_dir is None:
        raise BadInputError("the model keeps weights in external files but their folder is unknown; load it by path")
    return {loc: np.memmap(Path(base_dir) / loc, dtype=np.uint8, mode="r") for loc in sorted(locations)}


class Moments:
    """The reductions of one layer over one fold of samples (see the module docstring)."""

    def __init__(self, outputs: int, features: int | None):
        self.rows = 0
        self.yy, self.dsum, self.dsq = np.zeros(outputs), np.zeros(outputs), np.zeros(outputs)
        k = None if features is None else features + 1
        self.a = None if k is None else np.zeros((k, k))
        self.g = None if k is None else np.zeros((k, outputs))

    def add(self, x: np.ndarray | None, yt: np.ndarray, ys: np.ndarray) -> None:
        yt, ys = yt.astype(np.float64), ys.astype(np.float64)
        keep = np.isfinite(yt).all(1) & np.isfinite(ys).all(1)
        if x is not None:
            x = x.astype(np.float64)
            keep &= np.isfinite(x).all(1)
        if not keep.all():
            yt, ys, x = yt[keep], ys[keep], (None if x is None else x[keep])
        d = yt - ys
        self.rows += yt.shape[0]
        self.yy += np.square(yt).sum(0)
        self.dsum += d.sum(0)
        self.dsq += np.square(d).sum(0)
        if self.a is not None and x is not None:
            xa = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)
            self.a += xa.T @ xa
            self.g += xa.T @ yt

    def __add__(self, other: Moments) -> Moments:
        out = Moments(len(self.yy), None)
        out.rows = self.rows + other.rows
        out.yy, out.dsum, out.dsq = self.yy + other.yy, self.dsum + other.dsum, self.dsq + other.dsq
        if self.a is not None:
            out.a, out.g = self.a + other.a, self.g + other.g
        return out


def accumulate(layer: Layer, moments: Moments, x: np.ndarray | None, yt: np.ndarray, ys: np.ndarray) -> str | None:
    """Add one sample of ``layer`` to ``moments``; the reason when its tensors do not line up (nothing added)."""
    if yt.shape != ys.shape:
        return f"teacher output has shape {list(yt.shape)}, the student's {list(ys.shape)}"
    m = len(moments.yy)
    channel = 1 if layer.node.op == "Conv" else -1
    if yt.ndim < 2 or yt.shape[channel] != m:
        return f"output of shape {list(yt.shape)} does not have {m} channels"
    if x is None:  # bias only: the output rows are enough
        moments.add(None, *(np.moveaxis(y, channel, -1).reshape(-1, m) for y in (yt, ys)))
        return None
    blocks = _rows(layer, x, yt, ys, m)
    if isinstance(blocks, str):
        return blocks
    for xr, tr, sr in blocks:
        moments.add(xr, tr, sr)
    return None


def _rows(layer: Layer, x, yt, ys, m: int):
    node = layer.node
    if node.op == "Conv":
        return _conv_rows(layer, x, yt, ys, m)
    if node.op == "Gemm" and int(node.attrs.get("transA", 0)):
        x = x.T
    k = moments_features(layer)
    if x.ndim < 2 or x.shape[-1] != k or x.size // k != yt.size // m:
        return f"input of shape {list(x.shape)} does not line up with the output {list(yt.shape)}"
    x2, t2, s2 = x.reshape(-1, k), yt.reshape(-1, m), ys.reshape(-1, m)
    step = max(1, _CHUNK // max(k, 1))
    return [(x2[i : i + step], t2[i : i + step], s2[i : i + step]) for i in range(0, x2.shape[0], step)]


def _conv_rows(layer: Layer, x, yt, ys, m: int):
    spec = layer.patches
    k = len(spec.kernel)
    if x.ndim != 2 + k or yt.ndim != 2 + k or x.shape[0] != yt.shape[0]:
        return f"Conv input {list(x.shape)} does not line up with its output {list(yt.shape)}"
    spatial = [
        (x.shape[2 + i] + spec.pads[i] + spec.pads[k + i] - spec.dilations[i] * (spec.kernel[i] - 1) - 1)
        // spec.strides[i]
        + 1
        for i in range(k)
    ]
    if list(yt.shape[2:]) != spatial or x.shape[1] * int(np.prod(spec.kernel)) != moments_features(layer):
        return f"Conv patches of input {list(x.shape)} do not line up with its output {list(yt.shape)}"
    out = [np.moveaxis(y if k == 2 else y[:, :, None, :], 1, -1) for y in (yt, ys)]  # [N, OH, OW, M]
    n, ow = out[0].shape[0], out[0].shape[2]

    def blocks() -> Iterator:
        r = 0
        for chunk in spec.rows(x, _CHUNK):  # whole output rows at a time, in (n, oh, ow) order
            h = chunk.shape[0] // (n * ow)
            yield chunk, out[0][:, r : r + h].reshape(-1, m), out[1][:, r : r + h].reshape(-1, m)
            r += h

    return blocks()


def moments_features(layer: Layer) -> int:
    """K: the input features of the effective weight."""
    w = layer.weight
    return int(np.prod(w.shape[1:])) if layer.node.op == "Conv" else int(w.shape[1 - _out_axis(layer)])


def _out_axis(layer: Layer) -> int:
    node = layer.node
    if node.op == "Gemm":
        return 0 if int(node.attrs.get("transB", 0)) else 1
    return 1  # MatMul [K, M]
