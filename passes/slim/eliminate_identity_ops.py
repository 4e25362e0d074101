"""eliminate_identity_ops: remove nodes that return their input unchanged, y = f(x) = x.

Removed (consumers are rewired to x):
- Identity; Dropout in inference (no training_mode, or a constant false one; the mask output unused);
- Cast / CastLike to the type x already has (x's dtype must be known);
- Reshape to x's own shape (a constant target that resolves to x's known dims, or both shapes static and equal);
- Transpose whose perm is the identity; Slice that keeps everything (starts 0, steps 1, ends >= dim or
  >= INT32_MAX); Pad with all-zero pads; Expand whose target broadcasts to x's known shape; one-input Concat;
- x*1, 1*x, x/1, x+0, 0+x, x-0, when the constant has x's dtype, rank <= x's rank, and every dim of it
  is 1 or equal to x's static dim (so broadcasting changes neither shape nor dtype).

Graph outputs keep their names (they are the model's contract): when y is an output of its graph, x is
renamed to y instead, which needs x to be produced by a node of the same graph and to be no graph input or
output itself; otherwise the node is kept and the skip is reported. Runs on every subgraph.

Exact: every removal is an identity on values. One documented nuance: x + 0.0 turns -0.0 into +0.0, so
removing it can flip the sign of a zero; ``ignore_zero_sign=false`` keeps those nodes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxslim.graph_edit import peek_values, replace_input
from onnxslim.pass_base import Pass, PassContext, PassResult, iter_graphs

__all__ = ["EliminateIdentityOps"]

log = logging.getLogger(__name__)

_INT32_MAX = 2**31 - 1
_STANDARD = (None, "", "ai.onnx")


# ------------------------------------------------------------------------------------------- tensor facts
def _onnx_dtype(t: gs.Tensor) -> int | None:
    """The ONNX element type of a tensor, or None when unknown."""
    d = t.dtype
    if d is None:
        return None
    if isinstance(d, int):
        return d
    try:
        return int(onnx.helper.np_dtype_to_tensor_dtype(np.dtype(d)))
    except Exception:  # noqa: BLE001 - exotic dtypes gs can't describe
        return None


def _shape(t: gs.Tensor) -> list | None:
    if isinstance(t, gs.Constant):
        return list(t.shape)
    return list(t.shape) if t.shape is not None else None


def _static(d) -> bool:
    return isinstance(d, (int, np.integer)) and d >= 0


def _ints(t: gs.Tensor) -> list[int] | None:
    """A small constant integer tensor as a list (None when not a constant)."""
    if not isinstance(t, gs.Constant):
        return None
    arr = peek_values(t)
    if arr.dtype.kind not in "iu" or arr.ndim > 1:
        return None
    return [int(v) for v in arr.reshape(-1)]


def _is_empty(t: gs.Tensor | None) -> bool:
    return t is None or (isinstance(t, gs.Variable) and not t.name)


def _broadcast_keeps(const_shape: list, x_shape: list | None) -> bool:
    """Whether broadcasting x with a tensor of const_shape leaves x's shape as it is."""
    if x_shape is None or len(const_shape) > len(x_shape):
        return False
    for c, d in zip(reversed(const_shape), reversed(x_shape)):
        if c == 1:
            continue
        if not (_static(d) and int(d) == int(c)):
            return False
    return True


# ------------------------------------------------------------------------------------------- the checks
# Each returns the index of the input the node passes through, or None when it is not a no-op.
def _identity(node: gs.Node, ctx: PassContext, opts) -> int | None:
    return 0


def _dropout(node: gs.Node, ctx: PassContext, opts) -> int | None:
    if node.attrs.get("is_test", 1) == 0:  # opset < 7 training mode
        return None
    if len(node.inputs) >= 3 and not _is_empty(node.inputs[2]):
        mode = node.inputs[2]
        if not isinstance(mode, gs.Constant) or np.any(peek_values(mode)):
            return None
    return 0


def _cast(node: gs.Node, ctx: PassContext, opts) -> int | None:
    src = _onnx_dtype(node.inputs[0])
    return 0 if src is not None and src == node.attrs.get("to") else None


def _cast_like(node: gs.Node, ctx: PassContext, opts) -> int | None:
    src, like = _onnx_dtype(node.inputs[0]), _onnx_dtype(node.inputs[1])
    return 0 if src is not None and src == like else None


def _reshape(node: gs.Node, ctx: PassContext, opts) -> int | None:
    x, y = node.inputs[0], node.outputs[0]
    in_shape = _shape(x)
    if in_shape is None:
        return None
    target = _ints(node.inputs[1]) if len(node.inputs) > 1 else None
    if target is None:
        # Dynamic target: a no-op only when both shapes are fully static and equal.
        out_shape = _shape(y)
        ok = (
            out_shape is not None
            and all(_static(d) for d in in_shape)
            and list(map(int, in_shape)) == [int(d) if _static(d) else -2 for d in out_shape]
        )
        return 0 if ok else None
    if len(target) != len(in_shape):
        return None
    allowzero = node.attrs.get("allowzero", 0)
    infer = [i for i, t in enumerate(target) if t == -1]
    if len(infer) > 1:
        return None
    for t, d in zip(target, in_shape):
        if t == -1:
            continue
        if t == 0 and not allowzero:
            continue  # copies the input dim
        if not (_static(d) and int(d) == t):
            return None
    if infer:
        # -1 is inferred from the element count; it equals x's dim when every other dim is known non-zero.
        others = [d for i, d in enumerate(in_shape) if i != infer[0]]
        if not all(_static(d) and int(d) > 0 for d in others):
            return None
    return 0


def _transpose(node: gs.Node, ctx: PassContext, opts) -> int | None:
    perm = node.attrs.get("perm")
    if perm is None:
        shape = _shape(node.inputs[0])
        return 0 if shape is not None and len(shape) <= 1 else None
    return 0 if list(perm) == list(range(len(perm))) else None


def _slice(node: gs.Node, ctx: PassContext, opts) -> int | None:
    if ctx.opset < 10:
        starts, ends = node.attrs.get("starts"), node.attrs.get("ends")
        axes, steps = node.attrs.get("axes"), None
        if starts is None or ends is None:
            return None
        starts, ends = list(starts), list(ends)
        axes = list(axes) if axes is not None else None
    else:
        ins = list(node.inputs) + [None] * (5 - len(node.inputs))
        starts, ends = _ints(ins[1]), _ints(ins[2])
        if starts is None or ends is None:
            return None
        axes = None if _is_empty(ins[3]) else _ints(ins[3])
        steps = None if _is_empty(ins[4]) else _ints(ins[4])
        if (not _is_empty(ins[3]) and axes is None) or (not _is_empty(ins[4]) and steps is None):
            return None
    if len(starts) != len(ends):
        return None
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps if steps is not None else [1] * len(starts)
    shape = _shape(node.inputs[0])
    for s, e, a, st in zip(starts, ends, axes, steps):
        if st != 1:
            return None
        dim = None
        if shape is not None and -len(shape) <= a < len(shape) and _static(shape[a]):
            dim = int(shape[a])
        if not (s == 0 or (dim is not None and s <= -dim)):
            return None
        if not (e >= _INT32_MAX or (dim is not None and e >= dim)):
            return None
    return 0


def _pad(node: gs.Node, ctx: PassContext, opts) -> int | None:
    if ctx.opset < 11:
        pads = node.attrs.get("pads", node.attrs.get("paddings"))
        pads = list(pads) if pads is not None else None
    else:
        pads = _ints(node.inputs[1]) if len(node.inputs) > 1 else None
    return 0 if pads is not None and all(p == 0 for p in pads) else None


def _expand(node: gs.Node, ctx: PassContext, opts) -> int | None:
    target = _ints(node.inputs[1])
    return 0 if target is not None and _broadcast_keeps(target, _shape(node.inputs[0])) else None


def _concat(node: gs.Node, ctx: PassContext, opts) -> int | None:
    return 0 if len(node.inputs) == 1 else None


def _elementwise(node: gs.Node, ctx: PassContext, opts) -> int | None:
    if len(node.inputs) != 2:
        return None
    unit = 1 if node.op in ("Mul", "Div") else 0
    positions = (1, 0) if node.op in ("Mul", "Add") else (1,)
    for ci in positions:
        c, x = node.inputs[ci], node.inputs[1 - ci]
        if not isinstance(c, gs.Constant) or isinstance(x, gs.Constant):
            continue
        xt = _onnx_dtype(x)
        if xt is not None and xt != _onnx_dtype(c):
            continue
        if not _broadcast_keeps(list(c.shape), _shape(x)):
            continue
        arr = peek_values(c)
        if arr.size == 0 or not np.all(arr == unit):
            continue
        if unit == 0 and arr.dtype.kind in "fc" and not opts.ignore_zero_sign:
            # x + (-0.0) and x - (+0.0) are exact for every x; the other signs turn -0.0 into +0.0.
            want_neg = node.op == "Add"
            if not np.all(np.signbit(arr.real) == want_neg):
                continue
        return 1 - ci
    return None


_CHECKS = {
    "Identity": _identity,
    "Dropout": _dropout,
    "Cast": _cast,
    "CastLike": _cast_like,
    "Reshape": _reshape,
    "Transpose": _transpose,
    "Slice": _slice,
    "Pad": _pad,
    "Expand": _expand,
    "Concat": _concat,
    "Mul": _elementwise,
    "Div": _elementwise,
    "Add": _elementwise,
    "Sub": _elementwise,
}


# ------------------------------------------------------------------------------------------- the pass
class EliminateIdentityOps(Pass):
    """Remove no-op nodes (Identity, inference Dropout, same-type Cast, same-shape Reshape, x*1, ...)."""

    name = "eliminate_identity_ops"

    @dataclass
    class Options:
        ignore_zero_sign: bool = field(
            default=True,
            metadata={
                "help": "remove x+0.0 and x-(-0.0) for floats too, although they turn -0.0 into +0.0 "
                "(as onnxsim and OnnxSlim do); false keeps them"
            },
        )

    def run(self, ctx: PassContext) -> PassResult:
        result = PassResult()
        scope = _Outputs.of(ctx.graph)
        for g in list(iter_graphs(ctx.graph)):
            result.merge(self._run_graph(g, ctx, scope))
        return result

    def run_graph(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        return self._run_graph(graph, ctx, _Outputs.of(ctx.graph))

    def _run_graph(self, graph: gs.Graph, ctx: PassContext, scope: _Outputs) -> PassResult:
        result = PassResult()
        local = {id(n) for n in graph.nodes}
        removed: set[int] = set()
        for node in list(graph.nodes):
            check = _CHECKS.get(node.op)
            if check is None or node.domain not in _STANDARD or not node.inputs or not node.outputs:
                continue
            if any(_is_empty(t) for t in node.outputs[:1]):
                continue
            extra = [t for t in node.outputs[1:] if not _is_empty(t)]
            if any(t.outputs or id(t) in scope.returned_by for t in extra):
                if node.op in ("Identity", "Dropout"):
                    result.skip(node, "its second output (mask) is used", graph)
                continue
            src_index = check(node, ctx, self.options)
            if src_index is None:
                continue
            reason = self._bypass(graph, node, node.inputs[src_index], scope, local)
            if reason:
                result.skip(node, reason, graph)
                continue
            removed.add(id(node))
            result.count(f"{node.op}_removed")
            result.count("nodes_removed")
            result.modified = True
        if removed:
            # Filter by identity: gs.Node.__eq__ compares contents, so list.remove could drop a twin.
            graph.nodes = [n for n in graph.nodes if id(n) not in removed]
        return result

    def _bypass(self, graph: gs.Graph, node: gs.Node, x: gs.Tensor, scope: _Outputs, local: set[int]) -> str | None:
        """Make y's readers read x and drop the node; a reason when y's name must stay and can't."""
        y = node.outputs[0]
        owners = scope.returned_by.get(id(y), [])
        if any(g is not graph for g in owners):
            return "its output is returned by another graph"
        if owners:
            # y's name is a graph output: give x that name instead, when x is free to take it.
            if not isinstance(x, gs.Variable) or _is_empty(x) or not x.inputs:
                return "its output is a graph output and its input is a graph input or constant"
            if not any(id(p) in local for p in x.inputs):
                return "its output is a graph output and its input comes from an outer graph"
            if id(x) in scope.returned_by or id(x) in scope.graph_inputs:
                return "its output and its input are both graph inputs/outputs"
            name = y.name
            for consumer in list(y.outputs):
                replace_input(consumer, y, x)
            node.inputs.clear()
            node.outputs.clear()
            x.name = name
            if x.dtype is None:
                x.dtype = y.dtype
            if x.shape is None:
                x.shape = y.shape
            graph.outputs = [x if t is y else t for t in graph.outputs]
            scope.returned_by[id(x)] = scope.returned_by.pop(id(y))
            log.debug("removed %s (%s); renamed its input to %s", node.name, node.op, name)
            return None
        for consumer in list(y.outputs):
            replace_input(consumer, y, x)
        node.inputs.clear()
        node.outputs.clear()
        log.debug("removed %s (%s)", node.name, node.op)
        return None


@dataclass
class _Outputs:
    """One run's facts about graph boundaries: which graphs return a tensor (by id; a tensor may be an output
    of a subgraph of another graph) and which tensors are graph inputs."""

    returned_by: dict[int, list[gs.Graph]] = field(default_factory=dict)
    graph_inputs: set[int] = field(default_factory=set)

    @classmethod
    def of(cls, root: gs.Graph) -> _Outputs:
        out = cls()
        for g in iter_graphs(root):
            for t in g.outputs:
                out.returned_by.setdefault(id(t), []).append(g)
            out.graph_inputs.update(id(t) for t in g.inputs)
        return out
