"""fuse_scale_into_conv: fold ``Mul(Conv(x), s)`` / ``Div(Conv(x), d)`` into the Conv's weights and bias.

Conv(x, W, b) * s = Conv(x, W * s, b * s) for s per output channel (a scalar, [1], [C], [C, 1, ..] or
[1, C, 1, ..] against the [N, C, spatial...] output); Div by d uses s = 1 / d. ConvTranspose weights are
[C_in, C_out/group, ...], scaled along axis 1 per group. Computed in float64, cast to the weight dtype.

Preconditions: the Conv output is read by the Mul/Div alone (not a graph output); W, b and s are float
constants of one dtype; W read by this Conv alone and the model not growing (a scaled copy beside a shared
original would); s finite and d non-zero (an inf/NaN scale turns 0 * inf in the weights into NaN where the
original gave inf). New weights are fresh constants. Exact up to float rounding (x / d becomes
x * (1 / d)).
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
    scale_out_channels,
    set_conv_weights,
    take_output,
)

__all__ = ["FuseScaleIntoConv"]


class FuseScaleIntoConv(FusionPass):
    """Fold a constant per-channel Mul or Div after a Conv into its weights and bias."""

    name = "fuse_scale_into_conv"

    def fuse_graph(self, edit: GraphEditor, ctx: PassContext) -> PassResult:
        # Div only divides the Conv output (d / Conv(x) is not affine).
        return fuse_into_preceding_conv(
            edit,
            ("Mul", "Div"),
            self._fuse,
            lambda node, conv: f"{node.op.lower()}_fused_into_{conv.op.lower()}",
            positions=lambda node: (0, 1) if node.op == "Mul" else (0,),
        )

    def _fuse(self, edit: GraphEditor, conv: gs.Node, node: gs.Node, other: gs.Tensor) -> str | None:
        got = per_channel_operand(edit, conv, node, other)
        if isinstance(got, str):
            return got
        w, b, cout, vec = got
        s = vec.astype(np.float64)
        if node.op == "Div":
            if np.any(s == 0):
                return "division by zero"
            s = 1.0 / s
        if not np.all(np.isfinite(s)):
            return "non-finite scale"
        new_w = scale_out_channels(conv.op, w, s, int(conv.attrs.get("group", 1))).astype(w.dtype)
        new_b = None if b is None else (b.astype(np.float64).reshape(cout) * s).astype(w.dtype)
        gain = grows([new_w, new_b], [*conv.inputs[1:3], other])
        if gain > 0:
            return f"the model would grow by {gain} bytes (shared constants)"
        set_conv_weights(edit, conv, new_w, new_b)
        take_output(conv, node)
        return None
