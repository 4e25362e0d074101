"""fuse_bias_add_into_conv: fold ``Add(Conv(x), c)`` into the Conv's bias when c is per output channel.

Conv(x, W, b) + c = Conv(x, W, b + c) whenever c broadcasts as a per-output-channel vector against the
[N, C, spatial...] output without growing it: a scalar, [1], [C], [C, 1, ..] or [1, C, 1, ..]. Also for
ConvTranspose. The sum is computed in float64 and cast to the weight dtype.

Preconditions: the Conv output is read by the Add alone (and is not a graph output); W, b (if any) and c
are float constants of the weight's dtype; the model must not grow (a scalar Add on a bias-less Conv, or a
constant shared with other readers, would add a [C] bias). New biases are fresh constants, never shared
ones edited in place. Exact up to float rounding.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.graph_edit import GraphEditor
from onnxslim.pass_base import PassContext, PassResult

from ._fusion_helpers import (
    FusionPass,
    fuse_into_preceding_conv,
    grows,
    per_channel_operand,
    set_conv_weights,
    take_output,
)

__all__ = ["FuseBiasAddIntoConv"]


class FuseBiasAddIntoConv(FusionPass):
    """Fold a constant per-channel Add after a Conv into the Conv's bias."""

    name = "fuse_bias_add_into_conv"

    def fuse_graph(self, edit: GraphEditor, ctx: PassContext) -> PassResult:
        return fuse_into_preceding_conv(edit, ("Add",), self._fuse, lambda add, conv: f"fused_into_{conv.op.lower()}")

    def _fuse(self, edit: GraphEditor, conv: gs.Node, add: gs.Node, other: gs.Tensor) -> str | None:
        got = per_channel_operand(edit, conv, add, other, scales_weight=False, kind="a per-output-channel bias")
        if isinstance(got, str):
            return got
        w, b, cout, vec = got
        b64 = np.zeros(cout) if b is None else b.astype(np.float64).reshape(cout)
        new_b = (b64 + vec.astype(np.float64)).astype(w.dtype)
        gain = grows([new_b], [conv.inputs[2] if len(conv.inputs) > 2 else None, other])
        if gain > 0:
            return f"the model would grow by {gain} bytes (a shared or scalar constant becomes a [C] bias)"
        set_conv_weights(edit, conv, None, new_b)
        take_output(conv, add)
        return None
