"""collapse_reshape_chains: merge back-to-back layout ops that only move or relabel elements.

Rules (y is the intermediate tensor; it must be read by the second node alone and not be a graph output):
- Reshape(s2) after Reshape/Flatten/Squeeze/Unsqueeze: these keep element order, so the Reshape can read
  the first input directly. A 0 in s2 (allowzero=0) copies y's dim: it is resolved from the first
  Reshape's constant shape or y's static shape, else the pair is skipped. -1 depends only on the size.
- Flatten(axis) after Flatten/Reshape/Squeeze/Unsqueeze: Flatten∘Flatten(1) is the first Flatten,
  Flatten(0) of anything is Flatten(0) of its input; otherwise the Flatten becomes Reshape(x, [L, -1]) or
  [-1, R] when y's dims on one side of the axis are static.
- Transpose(p2) after Transpose(p1): one Transpose with perm p1[p2[i]]; an identity result removes both.
- Squeeze→Squeeze and Unsqueeze→Unsqueeze merge into one node with the combined axes.
- Squeeze(a)→Unsqueeze(a) and Unsqueeze(a)→Squeeze(a) cancel (axes from the attribute before opset 13,
  from a constant input from 13 on; negative axes compared after normalising with a known rank).
When the second node's output is a graph output and the pair cancels, one Identity keeps its name.
Exact: no arithmetic, only indexing.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.graph_edit import GraphEditor, const_value
from onnxslim.pass_base import PassContext, PassResult

from ._fusion_helpers import FusionPass

__all__ = ["CollapseReshapeChains"]

_ORDER_KEEPING = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")


def _static(shape) -> list[int] | None:
    if shape is None:
        return None
    return [d if isinstance(d, int) and d >= 0 else None for d in shape]


def _axes(node: gs.Node, opset: int) -> list[int] | None:
    """Raw axes of a Squeeze/Unsqueeze, None when absent or not constant."""
    if opset < 13 or "axes" in node.attrs:
        return [int(a) for a in node.attrs["axes"]] if "axes" in node.attrs else None
    if len(node.inputs) < 2 or node.inputs[1].name == "":
        return None
    v = const_value(node.inputs[1])
    return None if v is None else [int(a) for a in v.reshape(-1)]


def _norm(axes: list[int], rank: int | None) -> list[int] | None:
    if rank is None:
        return sorted(axes) if all(a >= 0 for a in axes) or all(a < 0 for a in axes) else None
    return sorted(a % rank for a in axes)


class CollapseReshapeChains(FusionPass):
    """Merge Reshape/Flatten chains, compose Transpose pairs, cancel Squeeze/Unsqueeze pairs."""

    name = "collapse_reshape_chains"

    def fuse_graph(self, edit: GraphEditor, ctx: PassContext) -> PassResult:
        graph = edit.graph
        result = PassResult()
        for node in list(graph.nodes):
            # A merged node may now follow another mergeable node: keep going until nothing applies.
            while edit.owns(node) and node.inputs and node.inputs[0].inputs:
                prev = node.inputs[0].inputs[0]
                if not edit.owns(prev) or prev.domain or node.domain:
                    break
                rule = self._rule(node, prev)
                if rule is None:
                    break
                if edit.sole_consumer(prev.outputs[0]) is not node or len(prev.outputs) != 1:
                    result.skip(node, f"{prev.op}→{node.op}: the intermediate has other readers", graph)
                    break
                key = f"{prev.op.lower()}_{node.op.lower()}_collapsed"  # before the rule renames ops
                reason = rule(edit, prev, node, ctx.opset)
                if reason:
                    result.skip(node, f"{prev.op}→{node.op}: {reason}", graph)
                    break
                result.count(key)
                result.modified = True
        return result

    def _rule(self, node: gs.Node, prev: gs.Node):
        if node.op == "Reshape" and prev.op in _ORDER_KEEPING:
            return self._reshape_after
        if node.op == "Flatten" and prev.op in _ORDER_KEEPING:
            return self._flatten_after
        if node.op == "Transpose" and prev.op == "Transpose":
            return self._transposes
        if {node.op, prev.op} == {"Squeeze", "Unsqueeze"}:
            return self._squeeze_pair
        if node.op == prev.op and node.op in ("Squeeze", "Unsqueeze"):
            return self._same_squeezes
        return None

    # ---------------------------------------------------------------------------------------- rules
    def _reshape_after(self, edit: GraphEditor, prev: gs.Node, node: gs.Node, opset: int) -> str | None:
        s2 = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
        if s2 is None:
            return "target shape is not a constant"
        s2 = [int(v) for v in s2.reshape(-1)]
        if 0 in s2 and not int(node.attrs.get("allowzero", 0)):
            s1 = None
            if prev.op == "Reshape" and not int(prev.attrs.get("allowzero", 0)) and len(prev.inputs) > 1:
                v = const_value(prev.inputs[1])
                s1 = None if v is None else [int(x) for x in v.reshape(-1)]
            y = _static(prev.outputs[0].shape)
            new = list(s2)
            for i, d in enumerate(s2):
                if d != 0:
                    continue
                if s1 is not None and i < len(s1) and s1[i] >= 0:
                    new[i] = s1[i]  # s1[i] == 0 also copies x's dim i: keep 0
                elif y is not None and i < len(y) and y[i] is not None:
                    new[i] = y[i]
                else:
                    return f"target dim {i} is 0 and the intermediate dim is unknown"
            if new != s2:
                self._set_input(
                    edit, node, 1, edit.new_constant(f"{node.name or 'Reshape'}_shape", np.asarray(new, np.int64))
                )
        self._skip_prev(edit, prev, node)
        return None

    def _flatten_after(self, edit: GraphEditor, prev: gs.Node, node: gs.Node, opset: int) -> str | None:
        axis = int(node.attrs.get("axis", 1))
        y = prev.outputs[0].shape
        rank = len(y) if y is not None else None
        if prev.op == "Flatten" and axis in (1, -1):
            # Flatten of a 2-D tensor at axis 1 changes nothing: keep the first Flatten's result.
            if edit.is_output(node.outputs[0]):
                return "its output is a graph output"
            out = node.outputs[0]
            edit.remove_node(node)
            edit.rewire_readers(out, prev.outputs[0])
            return None
        if axis == 0 or (prev.op == "Flatten" and axis == -2):
            node.attrs["axis"] = 0
            self._skip_prev(edit, prev, node)
            return None
        if opset < 5 or rank is None:
            return "intermediate rank unknown"
        axis = axis % rank if axis < 0 else axis
        dims = _static(y)
        left, right = dims[:axis], dims[axis:]
        if all(d is not None for d in right):
            shape = [-1, int(np.prod(right, dtype=np.int64))]
        elif all(d is not None for d in left):
            shape = [int(np.prod(left, dtype=np.int64)), -1]
        else:
            return "intermediate dims on both sides of the axis are dynamic"
        node.op = "Reshape"
        node.attrs.clear()
        node.inputs.append(edit.new_constant(f"{node.name or 'Flatten'}_shape", np.asarray(shape, np.int64)))
        self._skip_prev(edit, prev, node)
        return None

    def _transposes(self, edit: GraphEditor, prev: gs.Node, node: gs.Node, opset: int) -> str | None:
        p1, p2 = prev.attrs.get("perm"), node.attrs.get("perm")
        y = prev.outputs[0].shape
        if (p1 is None or p2 is None) and y is None:
            return "perm absent and rank unknown"
        rank = len(p1) if p1 is not None else len(p2) if p2 is not None else len(y)
        p1 = list(p1) if p1 is not None else list(range(rank))[::-1]
        p2 = list(p2) if p2 is not None else list(range(rank))[::-1]
        if len(p1) != len(p2):
            return "perms of different length"
        perm = [int(p1[i]) for i in p2]
        if perm == list(range(rank)):
            return self._cancel(edit, prev, node)
        node.attrs["perm"] = perm
        self._skip_prev(edit, prev, node)
        return None

    def _squeeze_pair(self, edit: GraphEditor, prev: gs.Node, node: gs.Node, opset: int) -> str | None:
        a1, a2 = _axes(prev, opset), _axes(node, opset)
        if a1 is None or a2 is None:
            return "axes absent or not constant"
        # Both nodes' axes refer to the larger rank: Squeeze's input, Unsqueeze's output.
        big = prev.inputs[0] if prev.op == "Squeeze" else prev.outputs[0]
        rank = len(big.shape) if big.shape is not None else None
        n1, n2 = _norm(a1, rank), _norm(a2, rank)
        if n1 is None or n2 is None or n1 != n2 or len(set(n1)) != len(n1):
            return f"axes {a1} and {a2} do not cancel"
        return self._cancel(edit, prev, node)

    def _same_squeezes(self, edit: GraphEditor, prev: gs.Node, node: gs.Node, opset: int) -> str | None:
        a1, a2 = _axes(prev, opset), _axes(node, opset)
        if a1 is None or a2 is None:
            return "axes absent or not constant"
        # Normalise negative axes: Squeeze axes refer to each node's input rank, Unsqueeze to its output rank.
        ref1 = prev.inputs[0] if prev.op == "Squeeze" else prev.outputs[0]
        ref2 = node.inputs[0] if node.op == "Squeeze" else node.outputs[0]
        n1 = _norm(a1, len(ref1.shape) if ref1.shape is not None else None)
        n2 = _norm(a2, len(ref2.shape) if ref2.shape is not None else None)
        if n1 is None or n2 is None or any(a < 0 for a in n1 + n2):
            return "negative axes with an unknown rank"
        if len(set(n1)) != len(n1) or len(set(n2)) != len(n2):
            return "repeated axes"
        # The later-applied axes index the bigger tensor directly for Unsqueeze (a2), the earlier ones for
        # Squeeze (a1); the other set indexes the remaining positions in order.
        outer, inner = (n2, n1) if node.op == "Unsqueeze" else (n1, n2)
        free = (i for i in range(max(outer + inner, default=0) + len(outer) + 1) if i not in set(outer))
        free_list = list(free)
        axes = sorted(set(outer) | {free_list[p] for p in inner})
        if opset >= 13 and "axes" not in node.attrs:
            self._set_input(
                edit, node, 1, edit.new_constant(f"{node.name or node.op}_axes", np.asarray(axes, np.int64))
            )
        else:
            node.attrs["axes"] = axes
        self._skip_prev(edit, prev, node)
        return None

    # ------------------------------------------------------------------------------------ rewrites
    def _set_input(self, edit: GraphEditor, node: gs.Node, i: int, t: gs.Tensor) -> None:
        old = node.inputs[i]
        node.inputs[i] = t
        edit.drop_dead_constant(old)

    def _skip_prev(self, edit: GraphEditor, prev: gs.Node, node: gs.Node) -> None:
        """``node`` reads ``prev``'s input directly; ``prev`` goes."""
        node.inputs[0] = prev.inputs[0]
        edit.remove_node(prev)

    def _cancel(self, edit: GraphEditor, prev: gs.Node, node: gs.Node) -> str | None:
        """node(prev(x)) == x: readers of node's output read x; an Identity stays for a graph output."""
        x, out = prev.inputs[0], node.outputs[0]
        if edit.is_output(out):
            extra = list(node.inputs[1:])
            node.op = "Identity"
            node.attrs.clear()
            node.inputs.clear()
            node.inputs.append(x)
            for t in extra:
                edit.drop_dead_constant(t)
        else:
            edit.remove_node(node)
            edit.rewire_readers(out, x)
        edit.remove_node(prev)
        return None
