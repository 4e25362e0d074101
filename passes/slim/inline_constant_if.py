"""inline_constant_if: replace an If whose condition is a constant by the nodes of the branch it takes.

``If(c) {then} {else}`` with ``c`` constant becomes the taken branch's nodes, placed where the If was
(so the graph stays topologically sorted: a branch reads only tensors defined before its If). The
branch's outputs take the If outputs' names, so consumers and graph outputs are unchanged; a branch
output that is an outer tensor or a constant is forwarded (or, for a graph output, copied by Identity).
Branch tensors whose names clash with any other tensor of the model are renamed. Works in every graph,
subgraphs included, and repeats until no constant-condition If is left. Exact.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.graph_edit import constant_source, replace_uses
from onnxslim.pass_base import Pass, PassContext, PassResult, iter_graphs

__all__ = ["InlineConstantIf"]

log = logging.getLogger(__name__)


def _condition(node: gs.Node) -> bool | None:
    cond = node.inputs[0] if node.inputs else None
    src = constant_source(cond, through_identity=False)
    if src is None:
        return None
    arr = np.asarray(src.constant.values).reshape(-1)
    return bool(arr[0]) if arr.size == 1 else None


def _all_names(root: gs.Graph, skip: set[int]) -> dict[str, set[int]]:
    """Tensor name -> ids of the tensor objects carrying it, outside the graphs in ``skip``."""
    names: dict[str, set[int]] = {}
    for g in iter_graphs(root):
        if id(g) in skip:
            continue
        for t in list(g.inputs) + list(g.outputs):
            names.setdefault(t.name, set()).add(id(t))
        for node in g.nodes:
            for t in list(node.inputs) + list(node.outputs):
                if t.name:
                    names.setdefault(t.name, set()).add(id(t))
    return names


class InlineConstantIf(Pass):
    """Inline the taken branch of If nodes whose condition is a constant (subgraphs included)."""

    name = "inline_constant_if"

    def run(self, ctx: PassContext) -> PassResult:
        result = PassResult()
        while True:
            done = 0
            for g in list(iter_graphs(ctx.graph)):
                for node in list(g.nodes):
                    if node.op == "If" and node.domain in (None, "", "ai.onnx") and node in g.nodes:
                        done += self._inline(ctx.graph, g, node, result)
            if not done:
                return result

    def _inline(self, root: gs.Graph, graph: gs.Graph, node: gs.Node, result: PassResult) -> int:
        cond = _condition(node)
        if cond is None:
            return 0
        branch = node.attrs.get("then_branch" if cond else "else_branch")
        if not isinstance(branch, gs.Graph) or len(branch.outputs) != len(node.outputs) or branch.inputs:
            result.skip(node, "branch does not match the If's outputs", graph)
            return 0
        others = [v for v in node.attrs.values() if isinstance(v, gs.Graph)]
        skip = {id(s) for v in others for s in iter_graphs(v)}
        names = _all_names(root, skip)
        # Tensors that live in the branch's own scope move to the parent: give clashing ones new names.
        local: dict[int, gs.Tensor] = {}
        for n in branch.nodes:
            for t in list(n.outputs) + [t for t in n.inputs if isinstance(t, gs.Constant)]:
                if t.name:
                    local.setdefault(id(t), t)
        for t in local.values():
            owners = names.get(t.name, set()) - {id(t)}
            if owners:
                base, k = t.name, 1
                while f"{base}__inl{k}" in names:
                    k += 1
                t.name = f"{base}__inl{k}"
                names.setdefault(t.name, set()).add(id(t))
                result.count("tensors_renamed")
        produced = {id(t) for n in branch.nodes for t in n.outputs}
        pos = graph.nodes.index(node)
        outs = list(node.outputs)
        node.inputs.clear()
        node.outputs.clear()
        graph.nodes.remove(node)
        moved = list(branch.nodes)
        branch.nodes.clear()
        graph.nodes[pos:pos] = moved
        graph_outputs = {id(t) for t in graph.outputs}
        used: set[int] = set()
        extra: list[gs.Node] = []
        for o, b in zip(outs, list(branch.outputs)):
            if id(b) in produced and id(b) not in used:
                # The branch's producer writes the If's output tensor directly; branch readers follow it.
                used.add(id(b))
                prod = b.inputs[0]
                idx = prod.outputs.index(b)
                replace_uses(graph, b, o)  # the moved nodes are in ``graph`` now, their bodies below it
                prod.outputs[idx] = o
                if o.dtype is None:
                    o.dtype = b.dtype
            elif id(o) in graph_outputs or id(b) in used:
                extra.append(gs.Node("Identity", name=f"{o.name}__inl_identity", inputs=[b], outputs=[o]))
            else:
                replace_uses(root, o, b)
        branch.outputs.clear()
        graph.nodes[pos + len(moved) : pos + len(moved)] = extra
        result.count("ifs_inlined")
        result.count("nodes_inlined", len(moved))
        result.modified = True
        log.debug("inlined %s branch of %s (%d nodes)", "then" if cond else "else", node.name, len(moved))
        return 1
