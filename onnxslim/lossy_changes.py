"""Does a candidate carry lossy changes relative to its original? Read from the two protos, without running them.

``onnxslim check`` uses this to pick its mode when none is given: an int8, pruned or weight-shared candidate is
judged by the lossy metric floors (an exact check would demand ulp-level agreement and fail with a meaningless
tolerance), and the report says why. Markers: quantization ops the original lacks (Q/DQ, QLinear*, integer
matmuls/convs, MatMulNBits), weight-decoding chains (BitShift/CumSum unpacking codes or masks), float weights
with many more zeros (pruning) or with few distinct values (a codebook) than the original's.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import numpy_helper

from .graph import iter_graphs, iter_tensor_protos

__all__ = ["lossy_changes"]

_QUANT_OPS = {
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "QLinearConv",
    "QLinearMatMul",
    "MatMulInteger",
    "ConvInteger",
    "MatMulNBits",
    "GatherBlockQuantized",
    "QLinearAdd",
    "QLinearMul",
}
_DECODE_OPS = {"BitShift", "CumSum"}  # our packed codes / sparse masks are rebuilt by these
_MIN_WEIGHT = 1024  # elements: smaller tensors (biases, scales) say nothing about the weights
_MAX_SCAN = 1 << 22  # elements scanned per tensor (a prefix: enough to count zeros and distinct values)


def _ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for g in iter_graphs(model.graph) for n in g.node)


def _weight_profile(model: onnx.ModelProto) -> tuple[float, float]:
    """(fraction of zeros, fraction of weight tensors with <= 256 distinct values) over large float weights."""
    zeros = total = coded = tensors = 0
    for t in iter_tensor_protos(model):
        if t.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16):
            continue
        if t.data_location == onnx.TensorProto.EXTERNAL or int(np.prod(t.dims or [0])) < _MIN_WEIGHT:
            continue
        try:
            w = numpy_helper.to_array(t).ravel()[:_MAX_SCAN]
        except Exception:  # noqa: BLE001 - a tensor we cannot read says nothing either way
            continue
        zeros += int(np.count_nonzero(w == 0))
        total += w.size
        tensors += 1
        coded += int(np.unique(w).size <= 256)
    return (zeros / total if total else 0.0), (coded / tensors if tensors else 0.0)


def lossy_changes(original: onnx.ModelProto, candidate: onnx.ModelProto) -> list[str]:
    """Why ``candidate`` looks lossily changed from ``original`` (empty: nothing says so)."""
    reasons = []
    before, after = _ops(original), _ops(candidate)
    for group, what in ((_QUANT_OPS, "quantization"), (_DECODE_OPS, "weight-decoding")):
        added = {op: after[op] - before[op] for op in sorted(group) if after[op] > before[op]}
        if added:
            reasons.append(f"{what} nodes added ({', '.join(f'{op} +{n}' for op, n in added.items())})")
    z0, c0 = _weight_profile(original)
    z1, c1 = _weight_profile(candidate)
    if z1 > z0 + 0.05:
        reasons.append(f"zero weights {z0:.0%} -> {z1:.0%} (pruned)")
    if c1 > c0 + 0.2:
        reasons.append(f"weight tensors with <= 256 distinct values {c0:.0%} -> {c1:.0%} (shared codebooks)")
    return reasons
