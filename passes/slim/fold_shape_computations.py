"""fold_shape_computations: replace shape arithmetic on statically known dims by constants.

``Shape(x)`` (with ``start``/``end``), ``Size(x)`` and what is computed from them (Gather/Slice of a shape
vector, Unsqueeze/Squeeze, Concat, Cast, Identity, Add/Sub/Mul/Div) are evaluated symbolically, dim by
dim: a value element is an integer when the dim is static, unknown when it is a ``dim_param`` or not
inferred. Every tensor whose elements are all known becomes a constant, and the shape nodes nobody reads
any more are removed. A ``Shape -> Gather(1)`` of ``[batch, 64]`` folds to ``64`` while ``Gather(0)`` stays
dynamic.

Dims come from ONNX shape inference run on a weight-free copy, with the graph's intermediate annotations
dropped first (only graph inputs' declared types and the ops are trusted). Inside Loop/Scan bodies only
tensors defined outside the body are trusted (a loop-carried value's shape may change per iteration).
Custom-domain ops are never touched. Exact: the constants equal what the runtime computes for every input
the model's declared input types allow.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.graph_edit import constant_source
from onnxslim.pass_base import Pass, PassContext, PassResult
from onnxslim.shape_inference import infer_graph_types

__all__ = ["FoldShapeComputations"]

log = logging.getLogger(__name__)

_MAX_ELEMENTS = 64
_SHAPE_OPS = {
    "Shape",
    "Size",
    "Gather",
    "Slice",
    "Unsqueeze",
    "Squeeze",
    "Concat",
    "Cast",
    "Identity",
    "Add",
    "Sub",
    "Mul",
    "Div",
}
_INT_DTYPES = (np.dtype(np.int64), np.dtype(np.int32))


@dataclass
class _Value:
    """A small integer tensor (scalar or 1-D) with some elements unknown (None)."""

    dtype: np.dtype
    scalar: bool
    elems: list[int | None]

    @property
    def known(self) -> bool:
        return all(e is not None for e in self.elems)


def _walk(graph: gs.Graph, trusted: bool, out: list[tuple[gs.Graph, bool]]) -> None:
    out.append((graph, trusted))
    for node in graph.nodes:
        for attr in node.attrs.values():
            for sub in attr if isinstance(attr, (list, tuple)) else [attr]:
                if isinstance(sub, gs.Graph):
                    _walk(sub, trusted and node.op == "If", out)


class FoldShapeComputations(Pass):
    """Fold Shape/Size and the shape arithmetic after them where the dims are statically known."""

    name = "fold_shape_computations"

    def run(self, ctx: PassContext) -> PassResult:
        result = PassResult()
        graphs: list[tuple[gs.Graph, bool]] = []
        _walk(ctx.graph, True, graphs)
        if not any(n.op in ("Shape", "Size") for g, _ in graphs for n in g.nodes):
            return result
        trusted_ids: set[int] = set()
        for g, trusted in graphs:
            if trusted:
                trusted_ids.update(id(t) for t in g.inputs)
                trusted_ids.update(id(t) for n in g.nodes for t in n.outputs)
        ev = _Evaluator(infer_graph_types(ctx.graph, ctx.opset, keep_value_info=False), ctx.opset, trusted_ids)
        for g, _ in graphs:
            folded = []
            for node in list(g.nodes):
                if node.domain not in (None, "", "ai.onnx") or node.op not in _SHAPE_OPS or len(node.outputs) != 1:
                    continue
                try:
                    value = ev.evaluate(node)
                except Exception as e:  # noqa: BLE001 - odd attrs/inputs: leave the node alone
                    log.debug("cannot evaluate %s (%s): %s", node.name, node.op, e)
                    value = None
                out = node.outputs[0]
                if value is None or not out.name or isinstance(out, gs.Constant):
                    continue
                ev.values[id(out)] = value
                if value.known and len(value.elems) <= _MAX_ELEMENTS:
                    folded.append(node)
            upstream = []
            for node in folded:
                upstream.extend(p for t in node.inputs for p in t.inputs)
                out = node.outputs[0]
                v = ev.values[id(out)]
                arr = np.array(v.elems, dtype=v.dtype)
                node.outputs.clear()
                node.inputs.clear()
                g.nodes.remove(node)
                out.to_constant(arr.reshape(()) if v.scalar else arr)
                result.count("nodes_folded")
            result.count("nodes_folded", self._remove_unused(g, upstream))
        result.modified = bool(result.stats.get("nodes_folded"))
        return result

    @staticmethod
    def _remove_unused(graph: gs.Graph, seeds: list[gs.Node]) -> int:
        """Shape-chain nodes upstream of the folds whose outputs nobody reads any more."""
        outputs = {id(t) for t in graph.outputs}
        todo, removed = list(seeds), 0
        while todo:
            n = todo.pop()
            if n not in graph.nodes or n.op not in _SHAPE_OPS or n.domain not in (None, "", "ai.onnx") or not n.outputs:
                continue
            if any(t.outputs or id(t) in outputs for t in n.outputs):
                continue
            todo.extend(p for t in n.inputs for p in t.inputs)
            n.inputs.clear()
            n.outputs.clear()
            graph.nodes.remove(n)
            removed += 1
        return removed


class _Evaluator:
    """Symbolic values of shape computations during one run: ``types`` from shape inference, ``trusted`` the
    tensors whose inferred dims may be relied on, ``values`` what was worked out so far (by tensor id)."""

    def __init__(self, types: dict, opset: int, trusted: set[int]):
        self._types, self._opset, self._trusted = types, opset, trusted
        self.values: dict[int, _Value] = {}

    def _value(self, t: gs.Tensor) -> _Value | None:
        if id(t) in self.values:
            return self.values[id(t)]
        src = constant_source(t, through_identity=False)
        if src is not None:
            t = src.constant  # an initializer, or a Constant node's value before fold_constants made it one
        if (
            isinstance(t, gs.Constant)
            and t.dtype is not None
            and np.dtype(t.dtype) in _INT_DTYPES
            and len(t.shape) <= 1
            and int(np.prod(t.shape)) <= _MAX_ELEMENTS
        ):
            arr = np.asarray(t.values)
            v = _Value(arr.dtype, arr.ndim == 0, [int(x) for x in arr.reshape(-1)])
            self.values[id(t)] = v
            return v
        return None

    def _ints(self, t: gs.Tensor | None) -> list[int] | None:
        if t is None or not t.name:
            return None
        v = self._value(t)
        return [int(e) for e in v.elems] if v is not None and v.known else None

    def _dims(self, t: gs.Tensor) -> list[int | None] | None:
        if isinstance(t, gs.Constant):
            return [int(d) for d in t.shape]
        if id(t) not in self._trusted or t.name not in self._types:
            return None
        dims = self._types[t.name][1]
        return None if dims is None else [d if isinstance(d, int) else None for d in dims]

    def evaluate(self, node: gs.Node) -> _Value | None:
        op, ins, a = node.op, node.inputs, node.attrs
        if op == "Shape":
            dims = self._dims(ins[0])
            if dims is None:
                return None
            r = len(dims)
            start, end = int(a.get("start", 0)), a.get("end")
            end = r if end is None else int(end)
            start, end = (start + r if start < 0 else start), (end + r if end < 0 else end)
            return _Value(np.dtype(np.int64), False, dims[max(0, min(r, start)) : max(0, min(r, end))])
        if op == "Size":
            dims = self._dims(ins[0])
            if dims is None:
                return None
            n = int(np.prod(dims)) if all(d is not None for d in dims) else None
            return _Value(np.dtype(np.int64), True, [n])
        if op in ("Identity", "Cast"):
            v = self._value(ins[0])
            if v is None:
                return None
            if op == "Cast":
                to = np.dtype({7: np.int64, 6: np.int32}.get(int(a.get("to", 0)), np.float32))
                if to not in _INT_DTYPES:
                    return None
                if to == np.int32 and any(e is not None and not -(2**31) <= e < 2**31 for e in v.elems):
                    return None
                return _Value(to, v.scalar, list(v.elems))
            return v
        if op == "Gather":
            data, idx = self._value(ins[0]), self._value(ins[1])
            if data is None or data.scalar or idx is None or not idx.known or int(a.get("axis", 0)) not in (0, -1):
                return None
            n = len(data.elems)
            picked = []
            for i in idx.elems:
                if not -n <= i < n:
                    return None
                picked.append(data.elems[i])
            return _Value(data.dtype, idx.scalar, picked)
        if op == "Slice":
            return self._slice(node)
        if op in ("Unsqueeze", "Squeeze"):
            v = self._value(ins[0])
            axes = a.get("axes") if self._opset < 13 else (self._ints(ins[1]) if len(ins) > 1 else None)
            if v is None or (axes is None and len(ins) > 1 and self._opset >= 13):
                return None
            if op == "Unsqueeze":
                return _Value(v.dtype, False, list(v.elems)) if v.scalar and list(axes or []) in ([0], [-1]) else None
            if not v.scalar and len(v.elems) == 1 and (axes is None or list(axes) in ([0], [-1])):
                return _Value(v.dtype, True, list(v.elems))
            return None
        if op == "Concat":
            vals = [self._value(t) for t in ins]
            if (
                int(a.get("axis", 0)) not in (0, -1)
                or any(v is None or v.scalar for v in vals)
                or len({v.dtype for v in vals}) != 1
            ):
                return None
            return _Value(vals[0].dtype, False, [e for v in vals for e in v.elems])
        if op in ("Add", "Sub", "Mul", "Div"):
            return self._arith(op, self._value(ins[0]), self._value(ins[1]))
        return None

    def _slice(self, node: gs.Node) -> _Value | None:
        ins, a = node.inputs, node.attrs
        data = self._value(ins[0])
        if data is None or data.scalar:
            return None
        if self._opset < 10:
            starts, ends, axes, steps = a.get("starts"), a.get("ends"), a.get("axes"), None
        else:
            get = lambda i: self._ints(ins[i]) if len(ins) > i else None  # noqa: E731
            starts, ends, axes, steps = get(1), get(2), get(3), get(4)
            if (
                starts is None
                or ends is None
                or (len(ins) > 3 and ins[3].name and axes is None)
                or (len(ins) > 4 and ins[4].name and steps is None)
            ):
                return None
        if starts is None or ends is None or len(starts) != 1 or len(ends) != 1:
            return None
        if axes is not None and list(axes) not in ([0], [-1]):
            return None
        step = 1 if steps is None else int(list(steps)[0])
        if step == 0:
            return None
        n = len(data.elems)
        s, e = int(starts[0]), int(ends[0])
        s, e = (s + n if s < 0 else s), (e + n if e < 0 else e)
        if step > 0:
            s, e = max(0, min(n, s)), max(0, min(n, e))
        else:
            s, e = max(-1, min(n - 1, s)), max(-1, min(n - 1, e))
        return _Value(data.dtype, False, [data.elems[i] for i in range(s, e, step)])

    @staticmethod
    def _arith(op: str, x: _Value | None, y: _Value | None) -> _Value | None:
        if x is None or y is None or x.dtype != y.dtype:
            return None
        if not (len(x.elems) == len(y.elems) or len(x.elems) == 1 or len(y.elems) == 1):
            return None  # numpy-style broadcasting of two 1-D (or 0-D) values only
        n = max(len(x.elems), len(y.elems))
        xs = x.elems * n if len(x.elems) == 1 and n > 1 else x.elems
        ys = y.elems * n if len(y.elems) == 1 and n > 1 else y.elems
        out: list[int | None] = []
        lim = 2**63 if x.dtype == np.int64 else 2**31
        for p, q in zip(xs, ys):
            if p is None or q is None:
                out.append(None)
                continue
            if op == "Add":
                r = p + q
            elif op == "Sub":
                r = p - q
            elif op == "Mul":
                r = p * q
            else:
                if q == 0:
                    return None
                r = abs(p) // abs(q) * (1 if (p >= 0) == (q > 0) else -1)  # C division truncates
            if not -lim <= r < lim:
                return None
            out.append(r)
        return _Value(x.dtype, x.scalar and y.scalar, out)
