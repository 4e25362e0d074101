"""fuse_matmul_add_into_gemm: ``Add(MatMul(A, B), C)`` → ``Gemm(A, B, C)`` for 2-D A.

Gemm(A, B, C) = A @ B + C with C unidirectionally broadcast to [M, N]. Only fused when A is known to be
2-D (static rank 2), B is a 2-D float constant, and C is a constant of B's dtype that broadcasts to the
[M, N] product without growing it: a scalar, [1], [N], [1, N] or [M, N] (M static and equal). 3-D and
higher MatMuls are never rewritten into Reshape/Gemm/Reshape (slower in onnxruntime). Exact: the same sum
in the same order up to float rounding.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxslim.graph_edit import GraphEditor, const_value
from onnxslim.pass_base import PassContext, PassResult

from ._fusion_helpers import FusionPass, take_output

__all__ = ["FuseMatmulAddIntoGemm"]

# Ops whose output rank is the largest input rank (numpy broadcasting or unary); used when a subgraph
# carries no shape information.
_BROADCASTING = {"Add", "Sub", "Mul", "Div", "Pow", "Min", "Max", "Sum", "Mean", "Where", "PRelu"}
_SAME_RANK = {
    "Relu",
    "Sigmoid",
    "Tanh",
    "Erf",
    "Exp",
    "Log",
    "Sqrt",
    "Abs",
    "Neg",
    "Cast",
    "Identity",
    "Clip",
    "LeakyRelu",
    "Elu",
    "Selu",
    "Softmax",
    "LogSoftmax",
    "HardSigmoid",
    "Softplus",
    "Gelu",
    "Dropout",
    "LayerNormalization",
    "BatchNormalization",
    "Reciprocal",
    "Floor",
    "Ceil",
    "Round",
    "Sign",
}


def _rank(t: gs.Tensor, depth: int = 0) -> int | None:
    """Static rank of ``t``: its shape, a constant's ndim, or derived through rank-keeping ops."""
    if isinstance(t, gs.Constant):
        return len(t.shape)
    if t.shape is not None:
        return len(t.shape)
    if depth > 32 or len(t.inputs) != 1:
        return None
    node = t.inputs[0]
    if node.domain or node.outputs[0] is not t:
        return None
    if node.op == "Gemm":
        return 2
    if node.op in _SAME_RANK and node.inputs:
        return _rank(node.inputs[0], depth + 1)
    if node.op in _BROADCASTING:
        ranks = [_rank(i, depth + 1) for i in node.inputs if i.name != ""]
        return None if not ranks or None in ranks else max(ranks)
    return None


class FuseMatmulAddIntoGemm(FusionPass):
    """Turn MatMul(2-D A, constant B) + constant C into one Gemm."""

    name = "fuse_matmul_add_into_gemm"

    def fuse_graph(self, edit: GraphEditor, ctx: PassContext) -> PassResult:
        graph = edit.graph
        result = PassResult()
        if ctx.opset < 7:
            return result  # Gemm before opset 7 needs the broadcast attribute; not worth it
        for add in [n for n in graph.nodes if n.op == "Add" and not n.domain and len(n.inputs) == 2]:
            for i in (0, 1):
                t, other = add.inputs[i], add.inputs[1 - i]
                if not t.inputs or t.inputs[0].op != "MatMul" or t.inputs[0].domain:
                    continue
                mm = t.inputs[0]
                reason = self._fuse(edit, mm, add, other)
                if reason:
                    result.skip(mm, f"MatMul + Add '{add.name}' not fused: {reason}", graph)
                    break
                edit.remove_node(add)
                result.count("gemm_created")
                result.modified = True
                break
        return result

    def _fuse(self, edit: GraphEditor, mm: gs.Node, add: gs.Node, other: gs.Tensor) -> str | None:
        if not edit.owns(mm) or edit.sole_consumer(mm.outputs[0]) is not add:
            return "the MatMul output has other readers"
        a = mm.inputs[0]
        rank = _rank(a)
        if rank != 2:
            return f"A is not known to be 2-D (rank {rank})"
        shape = list(a.shape) if a.shape is not None else [None, None]
        b = const_value(mm.inputs[1])
        if b is None or b.ndim != 2 or b.dtype.kind != "f":
            return "B is not a 2-D float constant"
        c = const_value(other)
        if c is None:
            return "the Add operand is not a constant"
        if c.dtype != b.dtype:
            return f"Add constant dtype {c.dtype} differs from B dtype {b.dtype}"
        m, n = shape[0], b.shape[1]
        cs = tuple(c.shape)
        ok = (
            len(cs) <= 2
            and (not cs or cs[-1] in (1, n))
            and (len(cs) < 2 or cs[0] == 1 or (isinstance(m, int) and cs[0] == m))
        )
        if not ok:
            return f"Add constant of shape {list(cs)} does not broadcast as Gemm's C for [{m}, {n}]"
        mm.op = "Gemm"
        mm.inputs.append(other)
        take_output(mm, add)
        return None
