"""drop_default_rnn_states: remove optional LSTM/GRU/RNN inputs that equal their spec default.

The ONNX spec gives the optional inputs of LSTM, GRU and RNN defaults: ``initial_h`` / ``initial_c`` are
zeros, ``B`` is zeros, ``P`` (LSTM peepholes) is zeros and ``sequence_lens`` is the full sequence length of
every batch entry. Feeding exactly those values is the same computation as feeding nothing, so such inputs
are dropped: a trailing one is removed, one in the middle becomes the empty name "" (omitted optional input).
Exporters (torch) build zero states as ``ConstantOfShape(Concat(.., Gather(Shape(x)), ..))``; once the
RNN stops reading it, that shape chain is dead and ``eliminate_dead_nodes`` removes it.

Preconditions, per input:
- ``initial_h`` / ``initial_c`` / ``B`` / ``P``: a constant (initializer or Constant node, through Identity)
  whose every element is +0, or a ``ConstantOfShape`` whose ``value`` is absent or +0. Its shape may be
  computed at run time: the op's contract requires the state shape [num_directions, batch, hidden], so if
  the model runs, zeros of that shape are the default whatever the batch is. -0.0 is kept (not bitwise
  the default).
- ``sequence_lens``: a constant whose every entry equals the sequence length, which must be static in the
  shape of X (axis 0, or 1 with ``layout=1``).
Exact: the outputs are bitwise what the op computes with the defaults.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.graph_edit import const_value
from onnxslim.pass_base import Pass, PassContext, PassResult

__all__ = ["DropDefaultRnnStates"]

log = logging.getLogger(__name__)

# Input index -> name, per op (X, W, R are required and never touched).
_OPTIONAL = {
    "LSTM": {3: "B", 4: "sequence_lens", 5: "initial_h", 6: "initial_c", 7: "P"},
    "GRU": {3: "B", 4: "sequence_lens", 5: "initial_h"},
    "RNN": {3: "B", 4: "sequence_lens", 5: "initial_h"},
}


def _all_plus_zero(v: np.ndarray) -> bool:
    if v.dtype.kind not in "fiub":
        return False
    if not np.all(v == 0):
        return False
    return not (v.dtype.kind == "f" and np.any(np.signbit(v)))


def _is_zero(t: gs.Tensor) -> bool:
    v = const_value(t)
    if v is not None:
        return _all_plus_zero(v)
    if isinstance(t, gs.Variable) and len(t.inputs) == 1:
        producer = t.inputs[0]
        if producer.op == "ConstantOfShape" and producer.domain in (None, "", "ai.onnx"):
            value = producer.attrs.get("value")
            if value is None:
                return True  # spec default: float32 zero
            if isinstance(value, gs.Constant):
                return _all_plus_zero(np.asarray(value.values))
    return False


def _is_full_length(node: gs.Node, t: gs.Tensor) -> bool:
    v = const_value(t)
    if v is None or v.dtype.kind not in "iu":
        return False
    x = node.inputs[0]
    axis = 1 if int(node.attrs.get("layout", 0)) == 1 else 0
    shape = x.shape
    if shape is None or len(shape) != 3 or not isinstance(shape[axis], (int, np.integer)):
        return False
    batch = shape[1 - axis]
    # The spec wants one length per batch entry; a malformed count is left for the runtime to reject.
    if v.ndim != 1 or not isinstance(batch, (int, np.integer)) or v.shape[0] != batch:
        return False
    return bool(np.all(v == shape[axis]))


class DropDefaultRnnStates(Pass):
    """Remove LSTM/GRU/RNN optional inputs equal to their default (zero states, zero bias, full lengths)."""

    name = "drop_default_rnn_states"

    def run_graph(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        for node in graph.nodes:
            optional = _OPTIONAL.get(node.op) if node.domain in (None, "", "ai.onnx") else None
            if not optional:
                continue
            changed = False
            for idx, what in optional.items():
                if idx >= len(node.inputs):
                    continue
                t = node.inputs[idx]
                if t is None or not t.name:
                    continue
                default = _is_full_length(node, t) if what == "sequence_lens" else _is_zero(t)
                if not default:
                    continue
                node.inputs[idx] = gs.Variable.empty()
                result.count(f"{what}_removed")
                changed = True
            if changed:
                # Trailing omitted inputs are dropped altogether; middle ones stay as "".
                while len(node.inputs) > 3 and not node.inputs[-1].name:
                    node.inputs.pop()
                result.modified = True
        return result
