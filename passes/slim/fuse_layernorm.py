"""fuse_layernorm: replace a decomposed LayerNorm by one ``LayerNormalization`` node.

Matches, with m = ReduceMean over trailing axes A (keepdims=1):

    d = x - m(x);  v = m(d^2)  [Pow(d, 2) or Mul(d, d)];  n = d / Sqrt(v + eps)  [or d * Reciprocal(..)]
    y = n [* gamma] [+ beta]

and writes ``y = LayerNormalization(x, gamma, beta, axis=-len(A), epsilon=eps)``, which is the same formula
(ONNX LayerNormalization: (x - mean) / sqrt(var + eps) * scale + bias over axes [axis, rank)).

Preconditions: default-domain opset >= 17 (where LayerNormalization exists; otherwise every candidate is
skipped with a reason); the reduced axes are the last k axes (given as attribute before opset 18, as a
constant input from 18 on), the same for both ReduceMeans; x is float32 or float16 with static normalized
dims; eps is a constant scalar; gamma / beta are constants that broadcast to exactly the normalized shape
without growing the output (ones / zeros are created when absent); every intermediate tensor is read only by
the next node of the pattern and is no graph output. Exact up to float rounding (LayerNormalization
accumulates in float32).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.graph_edit import GraphEditor, const_value
from onnxslim.pass_base import PassContext, PassResult

from ._fusion_helpers import FusionPass

__all__ = ["FuseLayernorm"]

log = logging.getLogger(__name__)

_DEFAULT = (None, "", "ai.onnx")
_FLOATS = (np.float32, np.float16)


def _op(node: gs.Node | None, *ops: str) -> bool:
    return node is not None and node.op in ops and node.domain in _DEFAULT


def _other(node: gs.Node, t: gs.Tensor) -> gs.Tensor | None:
    """The other input of a binary node that reads ``t`` once."""
    ins = list(node.inputs)
    if len(ins) != 2:
        return None
    if ins[0] is t and ins[1] is not t:
        return ins[1]
    if ins[1] is t and ins[0] is not t:
        return ins[0]
    return None


def _readers(t: gs.Tensor) -> list[gs.Node]:
    seen: dict[int, gs.Node] = {}
    for n in t.outputs:
        seen.setdefault(id(n), n)
    return list(seen.values())


def _scalar(t: gs.Tensor | None) -> float | None:
    v = const_value(t)
    if v is None or v.size != 1 or v.dtype.kind != "f":
        return None
    return float(v.reshape(-1)[0])


def _is_two(t: gs.Tensor) -> bool:
    """A Pow exponent of exactly 2 (float or integer)."""
    v = const_value(t)
    return v is not None and v.size == 1 and v.dtype.kind in "fiu" and float(v.reshape(-1)[0]) == 2.0


class FuseLayernorm(FusionPass):
    """Fuse ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div[/Mul/Add] into one LayerNormalization."""

    name = "fuse_layernorm"

    def fuse_graph(self, edit: GraphEditor, ctx: PassContext) -> PassResult:
        graph = edit.graph
        result = PassResult()
        opset = ctx.opset_of("") or 0
        for mean in [n for n in graph.nodes if _op(n, "ReduceMean")]:
            if not edit.owns(mean):
                continue
            match = self._match(edit, mean)
            if isinstance(match, str):
                if match:  # "" = not a LayerNorm at all, nothing worth reporting
                    result.skip(mean, f"not fused into LayerNormalization: {match}", graph)
                continue
            if opset < 17:
                result.skip(mean, f"not fused: LayerNormalization needs opset >= 17, the model has {opset}", graph)
                continue
            self._rewrite(edit, mean, match)
            result.count("layernorms_fused")
            result.modified = True
        return result

    # ------------------------------------------------------------------------------------ matching
    def _axes(self, node: gs.Node, rank: int | None) -> tuple[int, ...] | None:
        if int(node.attrs.get("keepdims", 1)) != 1 or int(node.attrs.get("noop_with_empty_axes", 0)) != 0:
            return None
        if "axes" in node.attrs:
            axes = list(node.attrs["axes"])
        elif len(node.inputs) > 1 and node.inputs[1].name:
            v = const_value(node.inputs[1])
            if v is None:
                return None
            axes = [int(a) for a in v.reshape(-1)]
        elif rank is not None:
            axes = list(range(rank))  # no axes: reduce over all of them
        else:
            return None
        if rank is not None:
            if any(a < -rank or a >= rank for a in axes):
                return None
            axes = [a - rank if a >= 0 else a for a in axes]
        elif any(a >= 0 for a in axes):
            return None
        axes = sorted(set(axes))
        if not axes or axes != list(range(-len(axes), 0)):
            return None  # only the last k axes, contiguous
        return tuple(axes)

    def _single(self, t: gs.Tensor) -> gs.Node | None:
        """The one node reading ``t`` (it may read it twice); graph outputs are checked once matched."""
        readers = _readers(t)
        return readers[0] if len(readers) == 1 else None

    def _match(self, edit: GraphEditor, mean: gs.Node) -> dict | str:
        x = mean.inputs[0]
        rank = len(x.shape) if x.shape is not None else None
        axes = self._axes(mean, rank)
        if axes is None:
            return ""
        m_out = mean.outputs[0]
        sub = self._single(m_out)
        if not _op(sub, "Sub") or len(sub.inputs) != 2 or sub.inputs[0] is not x or sub.inputs[1] is not m_out:
            return ""
        d = sub.outputs[0]
        readers = _readers(d)
        if len(readers) != 2:
            return ""
        sq = next(
            (
                n
                for n in readers
                if (_op(n, "Pow") and n.inputs[0] is d and _is_two(n.inputs[1]))
                or (_op(n, "Mul") and len(n.inputs) == 2 and n.inputs[0] is d and n.inputs[1] is d)
            ),
            None,
        )
        if sq is None:
            return ""
        div = next(n for n in readers if n is not sq)
        var = self._single(sq.outputs[0])
        if not _op(var, "ReduceMean") or self._axes(var, rank) != axes:
            return ""
        add_eps = self._single(var.outputs[0])
        if not _op(add_eps, "Add"):
            return ""
        eps = _scalar(_other(add_eps, var.outputs[0]))
        sqrt = self._single(add_eps.outputs[0])
        if eps is None or not _op(sqrt, "Sqrt"):
            return ""
        nodes = [mean, sub, sq, var, add_eps, sqrt]
        s = sqrt.outputs[0]
        if _op(div, "Div") and len(div.inputs) == 2 and div.inputs[0] is d and div.inputs[1] is s:
            if self._single(s) is not div:
                return "the Sqrt output has other readers"
        elif _op(div, "Mul") and _op(self._single(s), "Reciprocal"):
            recip = self._single(s)
            if _other(div, d) is not recip.outputs[0] or self._single(recip.outputs[0]) is not div:
                return ""
            nodes.append(recip)
        else:
            return ""
        nodes.append(div)
        out = div.outputs[0]
        gamma = beta = gamma_t = beta_t = None
        nxt = self._single(out)
        if _op(nxt, "Mul") and const_value(_other(nxt, out)) is not None:
            gamma_t = _other(nxt, out)
            gamma = const_value(gamma_t)
            nodes.append(nxt)
            out = nxt.outputs[0]
            nxt = self._single(out)
        if _op(nxt, "Add") and const_value(_other(nxt, out)) is not None:
            beta_t = _other(nxt, out)
            beta = const_value(beta_t)
            nodes.append(nxt)
            out = nxt.outputs[0]
        # Every intermediate (all outputs but the last) must be read inside the pattern only.
        for n in nodes[:-1]:
            if any(edit.is_output(o) for o in n.outputs):
                return f"'{n.outputs[0].name}' is a graph output"
        for n in nodes:
            if not edit.owns(n):
                return ""
        if x.dtype not in _FLOATS:
            return f"input dtype {x.dtype} (float32/float16 only)"
        if rank is None or any(not isinstance(dim, (int, np.integer)) for dim in x.shape[len(x.shape) - len(axes) :]):
            return "the normalized dims of the input are not static"
        norm_shape = tuple(int(dim) for dim in x.shape[rank - len(axes) :])
        params = []
        for what, v, fill in (("gamma", gamma, 1), ("beta", beta, 0)):
            if v is None:
                params.append(np.full(norm_shape, fill, dtype=x.dtype))
                continue
            if v.dtype != x.dtype or v.ndim > rank:
                return f"{what} has dtype {v.dtype} / rank {v.ndim}"
            lead = v.shape[: max(0, v.ndim - len(axes))]
            if (
                any(s != 1 for s in lead)
                or tuple(v.shape[len(lead) :]) != norm_shape[len(norm_shape) - (v.ndim - len(lead)) :]
            ):
                return f"{what} of shape {list(v.shape)} does not fit the normalized shape {list(norm_shape)}"
            params.append(np.ascontiguousarray(np.broadcast_to(v.reshape(v.shape[len(lead) :]), norm_shape)))
        return {
            "x": x,
            "nodes": nodes,
            "out": out,
            "eps": eps,
            "axis": -len(axes),
            "gamma": params[0],
            "beta": params[1],
            "gamma_t": gamma_t,
            "beta_t": beta_t,
        }

    # ------------------------------------------------------------------------------------ rewriting
    def _param(self, edit: GraphEditor, t: gs.Tensor | None, values: np.ndarray, base: str) -> gs.Tensor:
        """The pattern's own constant when it already has the normalized shape, else a new constant."""
        v = const_value(t) if t is not None else None
        if v is not None and v.shape == values.shape:
            return t
        return edit.new_constant(base, values)

    def _rewrite(self, edit: GraphEditor, mean: gs.Node, match: dict) -> None:
        nodes: list[gs.Node] = match["nodes"]
        tail = nodes[-1]
        base = mean.name or "LayerNorm"
        gamma = self._param(edit, match["gamma_t"], match["gamma"], f"{base}_scale")
        beta = self._param(edit, match["beta_t"], match["beta"], f"{base}_bias")
        out = match["out"]
        tail.outputs.clear()
        ln = gs.Node(
            op="LayerNormalization",
            name=edit.fresh_name(f"{base}_fused"),
            attrs={"axis": match["axis"], "epsilon": float(match["eps"])},
            inputs=[match["x"], gamma, beta],
            outputs=[out],
        )
        edit.insert_node(ln, before=tail)
        for n in nodes:
            edit.remove_node(n)
