"""fuse_batchnorm_into_conv: fold an inference BatchNormalization into the Conv/ConvTranspose/Gemm before it.

With s = gamma / sqrt(var + eps), BN(y) = (y - mean) * s + beta is affine per output channel, so
    W' = W * s (per output channel),  b' = (b - mean) * s + beta
(computed in float64, then cast to the weight dtype). ConvTranspose weights are [C_in, C_out/group, ...]:
the scale runs along axis 1 inside each group. Gemm: BN over the last dim of the [M, N] output scales B's
columns (rows when transB=1) and C becomes (beta_gemm * C - mean) * s + beta with beta_gemm set to 1.

Preconditions: BN in inference mode (training_mode absent/0, spatial != 0, only its first output read);
the producer's output read by the BN alone and not a graph output; weights and BN params constant floats.
New weights are fresh constants (a shared constant is never edited in place); a weight read by
another node is not fused at all, since a scaled copy beside the original would grow the model (in
general a fusion is skipped when its new constants outweigh its share of the constants it replaces). Exact up
to float rounding.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.graph_edit import GraphEditor, const_value, is_shared
from onnxslim.pass_base import PassContext, PassResult

from ._fusion_helpers import (
    FusionPass,
    conv_out_channels,
    conv_weights,
    grows,
    scale_out_channels,
    set_conv_weights,
    take_output,
)

__all__ = ["FuseBatchnormIntoConv"]

log = logging.getLogger(__name__)

_PRODUCERS = ("Conv", "ConvTranspose", "Gemm")


def _bn_affine(bn: gs.Node) -> tuple[np.ndarray, np.ndarray, np.ndarray] | str:
    """(s, mean, beta) in float64, or why the BN can't be folded."""
    if int(bn.attrs.get("training_mode", 0)) != 0:
        return "training_mode=1"
    if int(bn.attrs.get("spatial", 1)) == 0:
        return "spatial=0 (per-activation statistics)"
    if len(bn.inputs) != 5:
        return "expects 5 inputs"
    params = [const_value(t) for t in bn.inputs[1:]]
    if any(p is None for p in params):
        return "BN parameters are not constants"
    if any(p.dtype.kind != "f" or p.ndim != 1 for p in params) or len({p.shape for p in params}) != 1:
        return "BN parameters are not 1-D float vectors of one length"
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    eps = float(bn.attrs.get("epsilon", 1e-5))
    s = gamma / np.sqrt(var + eps)
    if not np.all(np.isfinite(s)):
        return "non-finite scale (var + eps <= 0)"
    return s, mean, beta


class FuseBatchnormIntoConv(FusionPass):
    """Fold inference BatchNormalization into the preceding Conv, ConvTranspose or Gemm."""

    name = "fuse_batchnorm_into_conv"

    def fuse_graph(self, edit: GraphEditor, ctx: PassContext) -> PassResult:
        graph = edit.graph
        result = PassResult()
        for bn in [n for n in graph.nodes if n.op == "BatchNormalization" and not n.domain]:
            if not bn.inputs or not bn.inputs[0].inputs:
                continue
            prod = bn.inputs[0].inputs[0]
            if prod.op not in _PRODUCERS or prod.domain or not edit.owns(prod):
                continue
            reason = self._fuse(edit, prod, bn)
            if reason:
                result.skip(bn, f"not fused into {prod.op} '{prod.name}': {reason}", graph)
                continue
            edit.remove_node(bn)
            log.debug("fused %s into %s %s", bn.name, prod.op, prod.name)
            result.count(f"fused_into_{prod.op.lower()}")
            result.modified = True
        return result

    def _fuse(self, edit: GraphEditor, prod: gs.Node, bn: gs.Node) -> str | None:
        if edit.sole_consumer(prod.outputs[0]) is not bn or len(prod.outputs) != 1:
            return "the producer's output has other readers"
        if not edit.outputs_unused(bn):
            return "BN mean/var outputs are used"
        aff = _bn_affine(bn)
        if isinstance(aff, str):
            return aff
        s, mean, beta = aff
        if prod.op == "Gemm":
            return self._fuse_gemm(edit, prod, bn, s, mean, beta)
        got = conv_weights(prod)
        if isinstance(got, str):
            return got
        w, b = got
        group = int(prod.attrs.get("group", 1))
        cout = conv_out_channels(prod.op, w, group)
        if s.shape[0] != cout or (b is not None and b.size != cout):
            return f"BN has {s.shape[0]} channels, {prod.op} has {cout}"
        b64 = np.zeros(cout) if b is None else b.astype(np.float64).reshape(cout)
        new_w = scale_out_channels(prod.op, w, s, group).astype(w.dtype)
        new_b = ((b64 - mean) * s + beta).astype(w.dtype)
        gain = grows([new_w, new_b], [*prod.inputs[1:3], *bn.inputs[1:]])
        if gain > 0:
            return f"the model would grow by {gain} bytes (shared constants)"
        set_conv_weights(edit, prod, new_w, new_b)
        take_output(prod, bn)
        return None

    def _fuse_gemm(
        self, edit: GraphEditor, gemm: gs.Node, bn: gs.Node, s: np.ndarray, mean: np.ndarray, beta: np.ndarray
    ) -> str | None:
        b = const_value(gemm.inputs[1]) if len(gemm.inputs) > 1 else None
        if b is None or b.ndim != 2 or b.dtype.kind != "f":
            return "Gemm B is not a 2-D float constant"
        if is_shared(gemm.inputs[1]):
            return "B is shared with another node (fusing would duplicate it)"
        trans_b = int(gemm.attrs.get("transB", 0))
        n = b.shape[0] if trans_b else b.shape[1]
        if s.shape[0] != n:
            return f"BN has {s.shape[0]} channels, Gemm has {n}"
        c = None
        if len(gemm.inputs) > 2 and gemm.inputs[2].name != "":
            c = const_value(gemm.inputs[2])
            if c is None:
                return "Gemm C is not a constant"
            if c.ndim > 2:
                return "Gemm C has rank > 2"
        gemm_beta = float(gemm.attrs.get("beta", 1.0))
        c64 = np.zeros(n) if c is None else gemm_beta * c.astype(np.float64)
        new_c = (c64 - mean) * s + beta  # broadcasts to [N] or [M, N]
        scale = s.reshape(-1, 1) if trans_b else s.reshape(1, -1)
        new_b = (b.astype(np.float64) * scale).astype(b.dtype)
        new_c = new_c.astype(b.dtype)
        gain = grows([new_b, new_c], [*gemm.inputs[1:3], *bn.inputs[1:]])
        if gain > 0:
            return f"the model would grow by {gain} bytes (shared constants or a broadcast C)"
        base = gemm.name or "Gemm"
        edit.set_constant_input(gemm, 1, new_b, f"{base}_B")
        edit.set_constant_input(gemm, 2, new_c, f"{base}_C")
        gemm.attrs["beta"] = 1.0
        take_output(gemm, bn)
        return None
