"""eliminate_common_subexpressions: compute each distinct expression once, f(a, b) == f(a, b).

Two nodes of one graph merge when they have the same op, domain, attributes and number of outputs and
read the same inputs: the same tensors, or small constants equal in dtype, shape and bytes. Every reader of
the dropped node's outputs (subgraphs included) is rewired to the kept node's outputs; repeated until
nothing merges, so chains of duplicates collapse.

Never merged: random ops (Random*, Multinomial, Bernoulli, Dropout), nodes with subgraph attributes,
ops of custom domains (unless ``merge_custom_domains``), and two nodes that both produce graph outputs
(output names are the model's contract; when only one does, it is the one kept). Nodes of different
graphs are not merged. Exact: deterministic ops give equal outputs for equal inputs.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.graph_edit import peek_values, replace_input
from onnxslim.pass_base import Pass, PassContext, PassResult, iter_graphs

__all__ = ["EliminateCommonSubexpressions"]

log = logging.getLogger(__name__)

_NONDETERMINISTIC = {
    "RandomNormal",
    "RandomNormalLike",
    "RandomUniform",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
    "Dropout",
}
_KNOWN_DOMAINS = {None, "", "ai.onnx", "ai.onnx.ml", "com.microsoft"}


class _Unmergeable(Exception):
    """An attribute we can't compare by value (subgraphs): the node is never merged."""


def _constant_key(t: gs.Constant, limit: int) -> Hashable:
    """Constants equal by value share a key when small; larger ones are compared by identity."""
    nbytes = int(getattr(t._values, "nbytes", 0) or 0) if not isinstance(t._values, np.ndarray) else t._values.nbytes
    if nbytes > limit:
        return ("const-id", id(t))
    arr = np.ascontiguousarray(peek_values(t))
    # The declared shape, not arr.shape: gs loads some scalars as shape (1,).
    payload = tuple(arr.reshape(-1).tolist()) if arr.dtype.kind == "O" else arr.tobytes()  # strings by value
    return ("const", str(t.dtype), str(arr.dtype), tuple(int(d) for d in t.shape), payload)


def _attr_key(value: Any, limit: int) -> Hashable:
    if isinstance(value, gs.Graph):
        raise _Unmergeable
    if isinstance(value, gs.Constant):
        return _constant_key(value, limit)
    if isinstance(value, (bool, np.bool_)):
        return ("b", bool(value))
    if isinstance(value, (float, np.floating)):
        return ("f", struct.pack("<d", float(value)))  # bitwise: 0.0 and -0.0 differ, NaN equals itself
    if isinstance(value, (int, np.integer)):
        return ("i", int(value))
    if isinstance(value, (str, bytes)):
        return ("s", value)
    if isinstance(value, (list, tuple)):
        return ("l", tuple(_attr_key(v, limit) for v in value))
    if isinstance(value, np.ndarray):
        return ("a", str(value.dtype), value.shape, value.tobytes())
    proto = getattr(value, "proto", None)  # raw attributes (sparse tensors, type protos) kept by graph.py
    if proto is not None and hasattr(proto, "SerializeToString"):
        return ("p", proto.SerializeToString(deterministic=True))
    if hasattr(value, "SerializeToString"):
        return ("p", value.SerializeToString(deterministic=True))
    if isinstance(value, gs.Tensor):
        return ("t", id(value))
    return ("r", type(value).__name__, repr(value))


def _input_key(t: gs.Tensor, limit: int) -> Hashable:
    if isinstance(t, gs.Constant):
        return _constant_key(t, limit)
    if not t.name:
        return ("empty",)
    return ("var", id(t))


def _graph_outputs(graphs: list[gs.Graph]) -> set[int]:
    """Tensors (by id) returned by any graph: their names must stay, so two of them never merge."""
    return {id(t) for g in graphs for t in g.outputs}


class EliminateCommonSubexpressions(Pass):
    """Merge nodes that compute the same thing from the same inputs (common subexpression elimination)."""

    name = "eliminate_common_subexpressions"

    @dataclass
    class Options:
        max_constant_bytes: int = field(
            default=65536,
            metadata={
                "help": "constants up to this size are compared by value; larger ones only by identity "
                "(run share_identical_weights first to make equal large constants one tensor)"
            },
        )
        merge_custom_domains: bool = field(
            default=False,
            metadata={"help": "also merge ops of custom domains (their kernels may be stateful or random)"},
        )

        def validate(self) -> str | None:
            return "max_constant_bytes must be >= 0" if self.max_constant_bytes < 0 else None

    def run(self, ctx: PassContext) -> PassResult:
        graphs = list(iter_graphs(ctx.graph))
        pinned = _graph_outputs(graphs)
        result = PassResult()
        for g in graphs:
            result.merge(self._merge_all(g, pinned))
        return result

    def run_graph(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        return self._merge_all(graph, _graph_outputs(list(iter_graphs(ctx.graph))))

    def _merge_all(self, graph: gs.Graph, pinned: set[int]) -> PassResult:
        result = PassResult()
        while True:
            merged = self._merge_round(graph, result, pinned)
            if not merged:
                break
            result.count("nodes_merged", merged)
            result.modified = True
        return result

    def _key(self, node: gs.Node) -> Hashable | None:
        if node.op in _NONDETERMINISTIC and node.domain in (None, "", "ai.onnx"):
            return None
        if node.domain not in _KNOWN_DOMAINS and not self.options.merge_custom_domains:
            return None
        if not node.outputs:
            return None
        limit = self.options.max_constant_bytes
        try:
            attrs = tuple(sorted((k, _attr_key(v, limit)) for k, v in node.attrs.items()))
        except _Unmergeable:
            return None
        inputs = tuple(_input_key(t, limit) for t in node.inputs)
        outputs = tuple(bool(t.name) for t in node.outputs)
        return (node.op, node.domain or "", attrs, inputs, outputs)

    def _merge_round(self, graph: gs.Graph, result: PassResult, pinned: set[int]) -> int:
        seen: dict[Hashable, gs.Node] = {}
        removed: set[int] = set()
        swapped = False
        for node in list(graph.nodes):
            key = self._key(node)
            if key is None:
                continue
            kept = seen.get(key)
            if kept is None:
                seen[key] = node
                continue
            kept_pinned = any(id(t) in pinned for t in kept.outputs)
            node_pinned = any(id(t) in pinned for t in node.outputs)
            if kept_pinned and node_pinned:
                result.skip(node, "it and its twin both produce graph outputs", graph)
                continue
            if node_pinned:
                # Keep the node whose outputs are graph outputs; it reads the same inputs, so it may
                # stand in for the earlier twin wherever that one was read (after toposort).
                kept, node = node, kept
                seen[key] = kept
                swapped = True
            for old, new in zip(node.outputs, kept.outputs):
                for consumer in list(old.outputs):
                    replace_input(consumer, old, new)
            node.inputs.clear()
            node.outputs.clear()
            removed.add(id(node))
            log.debug("merged %s into %s (%s)", node.name, kept.name, node.op)
        if removed:
            graph.nodes = [n for n in graph.nodes if id(n) not in removed]
            if swapped:
                graph.toposort(recurse_subgraphs=False)
        return len(removed)
