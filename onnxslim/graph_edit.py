"""The public graph-editing API: how a pass, built-in or third-party, reads and changes a graphsurgeon graph.

- ``iter_graphs``: the graph and every If/Loop/Scan body below it (protos too), the one walker.
- ``const_value`` / ``constant_source`` / ``peek_values``: the constant behind a tensor (an initializer, which
  graphsurgeon shares by object with the subgraphs that read it from an outer scope, a ``Constant`` node's
  value, or either behind a chain of Identity nodes, as exporters write tied weights); ``peek_values`` reads a
  constant without caching its values on the tensor (memory holds one weight at a time).
- ``Names``: unique fresh names for a whole model (every graph, subgraph and function; tensors and nodes).
- ``node_matches``: the one way options name nodes (a name, a glob ``*?[]``, ``re:REGEX`` or ``op:OpType``).
- ``GraphEditor``: the edits of one graph during one pass run (rewire a tensor's readers, remove or bypass a
  node, give a node input a new constant), with its per-run bookkeeping kept here, never on the pass. A pass
  gets one from ``PassContext.edit(graph)``.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from .graph import iter_graphs, tensor_nbytes
from .gs_bridge import peek_values

__all__ = [
    "iter_graphs",
    "peek_values",
    "constant_nbytes",
    "const_value",
    "constant_source",
    "ConstantSource",
    "is_shared",
    "producer",
    "replace_input",
    "replace_uses",
    "Names",
    "GraphEditor",
    "node_matches",
]

_IDENTITY_HOPS = 8  # Identity chains longer than this are not followed (none seen in real exports)


def constant_nbytes(const: gs.Constant) -> int:
    """Bytes of a constant's values, without loading them (lazy and external ones from dims and dtype)."""
    v = const._values
    if isinstance(v, LazyValues):
        return tensor_nbytes(v.tensor)
    return int(v.nbytes) if hasattr(v, "nbytes") else int(np.asarray(v).nbytes)


def producer(t: gs.Tensor | None) -> gs.Node | None:
    """The node that computes ``t`` (None for graph inputs, initializers and empty optional inputs)."""
    return t.inputs[0] if t is not None and len(t.inputs) == 1 else None


def _skip_identities(t: gs.Tensor | None) -> gs.Tensor | None:
    for _ in range(_IDENTITY_HOPS):
        if t is None or isinstance(t, gs.Constant) or len(t.inputs) != 1 or t.inputs[0].op != "Identity":
            break
        t = t.inputs[0].inputs[0] if t.inputs[0].inputs else None
    return t


@dataclass(frozen=True)
class ConstantSource:
    """Where a tensor's constant values live: ``constant`` holds them; ``node`` is the ``Constant`` node that
    produces the tensor (None when the tensor is an initializer)."""

    constant: gs.Constant
    node: gs.Node | None = None


def constant_source(t: gs.Tensor | None, *, through_identity: bool = True) -> ConstantSource | None:
    """The constant behind ``t``: itself (an initializer) or the ``value`` of the ``Constant`` node producing
    it, looking through Identity chains unless ``through_identity=False``; None when ``t`` is not constant."""
    if through_identity:
        t = _skip_identities(t)
    if t is None:
        return None
    if isinstance(t, gs.Constant):
        return ConstantSource(t)
    node = producer(t)
    if (
        node is not None
        and node.op == "Constant"
        and not node.domain
        and isinstance(node.attrs.get("value"), gs.Constant)
    ):
        return ConstantSource(node.attrs["value"], node)
    return None


def const_value(t: gs.Tensor | None, *, through_identity: bool = True) -> np.ndarray | None:
    """Values of an initializer or of a ``Constant`` node's output (any of its value attributes); None when
    ``t`` is not constant. Identity chains are followed unless ``through_identity=False``."""
    if through_identity:
        t = _skip_identities(t)
    if t is None:
        return None
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    node = producer(t)
    if node is not None and node.op == "Constant" and not node.domain:
        attrs = node.attrs
        if isinstance(attrs.get("value"), gs.Constant):
            return np.asarray(attrs["value"].values)
        for key, dtype in (
            ("value_float", np.float32),
            ("value_floats", np.float32),
            ("value_int", np.int64),
            ("value_ints", np.int64),
        ):
            if key in attrs:
                return np.asarray(attrs[key], dtype=dtype)
    return None


def node_matches(pattern: str, node: gs.Node) -> bool:
    """True when ``pattern`` names ``node``: ``op:OpType``, ``re:REGEX`` (full match of the name), a glob with
    ``*?[]``, or the exact node name."""
    if pattern.startswith("op:"):
        return node.op == pattern[3:]
    if pattern.startswith("re:"):
        return bool(node.name) and re.fullmatch(pattern[3:], node.name) is not None
    if any(c in pattern for c in "*?["):
        return bool(node.name) and fnmatch.fnmatchcase(node.name, pattern)
    return node.name == pattern


def is_shared(t: gs.Tensor) -> bool:
    """True when some other node also reads this constant (directly or through an Identity chain)."""
    for _ in range(_IDENTITY_HOPS):
        if len(t.outputs) > 1:
            return True
        if isinstance(t, gs.Constant) or len(t.inputs) != 1 or t.inputs[0].op != "Identity" or not t.inputs[0].inputs:
            return False
        t = t.inputs[0].inputs[0]
    return True


def replace_input(node: gs.Node, old: gs.Tensor, new: gs.Tensor) -> None:
    """``node`` reads ``new`` wherever it read ``old`` (compared by identity)."""
    for i, t in enumerate(node.inputs):
        if t is old:
            node.inputs[i] = new


def replace_uses(root: gs.Graph, old: gs.Tensor, new: gs.Tensor) -> None:
    """Every reader of ``old`` in ``root`` and the bodies below it reads ``new``; graph outputs too."""
    for g in iter_graphs(root):
        for node in g.nodes:
            replace_input(node, old, new)
        for i, t in enumerate(g.outputs):
            if t is old:
                g.outputs[i] = new


class Names:
    """Fresh names unique in a whole model: ``fresh("conv_W")`` gives ``conv_W``, else ``conv_W_1``, ...

    Made from every tensor and node name of the graph, its subgraphs and its functions; each name it hands
    out is taken from then on, so one ``Names`` serves a whole pass run."""

    def __init__(self, root: gs.Graph):
        self._taken: set[str] = set()
        for g in iter_graphs(root, functions=True):
            self._taken.update(g.tensors().keys())
            self._taken.update(n.name for n in g.nodes if n.name)

    def __contains__(self, name: str) -> bool:
        return name in self._taken

    def fresh(self, base: str) -> str:
        name, i = base, 0
        while name in self._taken:
            i += 1
            name = f"{base}_{i}"
        self._taken.add(name)
        return name


class GraphEditor:
    """The edits of one graph (the main graph or a body) during one pass run.

    Removed nodes are dropped from ``graph.nodes`` by ``commit()`` (or at the end of a ``with`` block), so a
    pass may keep iterating over a snapshot of the node list while it edits. Nodes are compared by identity
    (``gs.Node.__eq__`` compares contents)."""

    def __init__(self, graph: gs.Graph, names: Names):
        self.graph = graph
        self.names = names
        self._members = {id(n) for n in graph.nodes}
        self._dead: set[int] = set()
        # A nested body may return an outer value directly as its output; such a value has no reader node.
        self._output_ids = {id(t) for g in iter_graphs(graph) for t in g.outputs}

    def __enter__(self) -> GraphEditor:
        return self

    def __exit__(self, *exc) -> None:
        self.commit()

    def commit(self) -> None:
        """Drop the removed nodes from the graph."""
        if self._dead:
            self.graph.nodes = [n for n in self.graph.nodes if id(n) not in self._dead]
            self._members -= self._dead
            self._dead.clear()

    # ------------------------------------------------------------------------------------------ queries
    def owns(self, node: gs.Node) -> bool:
        """True when ``node`` lives in this graph (not an outer scope) and was not removed."""
        return id(node) in self._members and id(node) not in self._dead

    def is_output(self, t: gs.Tensor) -> bool:
        """True when ``t`` is an output of this graph or of a body inside it."""
        return id(t) in self._output_ids

    def sole_consumer(self, t: gs.Tensor) -> gs.Node | None:
        """The only node reading ``t`` when ``t`` is no graph output (of this graph or a body in it); else None."""
        if id(t) in self._output_ids or len(t.outputs) != 1:
            return None
        return t.outputs[0]

    def outputs_unused(self, node: gs.Node, keep: int = 1) -> bool:
        """True when the outputs past the first ``keep`` are read by nobody."""
        return all(not o.outputs and id(o) not in self._output_ids for o in node.outputs[keep:])

    def fresh_name(self, base: str) -> str:
        return self.names.fresh(base)

    # ------------------------------------------------------------------------------------------ edits
    def rewire_readers(self, old: gs.Tensor, new: gs.Tensor) -> bool:
        """Every reader of ``old`` reads ``new``. False (nothing changed) when ``old`` is a graph output:
        its name is part of the graph's interface, so the node computing it must stay."""
        if id(old) in self._output_ids:
            return False
        for consumer in list(old.outputs):
            replace_input(consumer, old, new)
        return True

    def bypass_node(self, node: gs.Node, input_index: int = 0) -> bool:
        """Remove a node that passes input ``input_index`` through unchanged: its readers read that input.
        False (nothing changed) when its output is a graph output."""
        if not self.rewire_readers(node.outputs[0], node.inputs[input_index]):
            return False
        self.remove_node(node)
        return True

    def insert_node(self, node: gs.Node, before: gs.Node | None = None) -> None:
        """Add a new node to this graph, in front of ``before`` (keeps a topological order) or at the end."""
        pos = next((i for i, n in enumerate(self.graph.nodes) if n is before), len(self.graph.nodes))
        self.graph.nodes.insert(pos, node)
        self._members.add(id(node))

    def remove_node(self, node: gs.Node) -> None:
        """Detach ``node`` and drop it, and any ``Constant`` node left without readers by that."""
        inputs = list(node.inputs)
        node.inputs.clear()
        node.outputs.clear()
        self._dead.add(id(node))
        for t in inputs:
            self.drop_dead_constant(t)

    def drop_dead_constant(self, t: gs.Tensor | None) -> None:
        """Drop the ``Constant`` node (or Identity-of-constant chain) behind ``t`` once nobody reads ``t``."""
        if isinstance(t, gs.Variable) and not t.outputs and id(t) not in self._output_ids and len(t.inputs) == 1:
            node = t.inputs[0]
            if not self.owns(node) or node.domain:
                return
            if node.op == "Constant":
                node.outputs.clear()
                self._dead.add(id(node))
            elif node.op == "Identity" and const_value(t) is not None:
                self.remove_node(node)

    def new_constant(self, base: str, values: np.ndarray) -> gs.Constant:
        return gs.Constant(self.fresh_name(base), np.ascontiguousarray(values))

    def set_constant_input(self, node: gs.Node, idx: int, values: np.ndarray, base: str) -> None:
        """Feed ``values`` to input ``idx`` as a new constant (a shared old one is never edited in place).
        The new constant takes the old one's name when nothing else reads the old one any more."""
        new = gs.Constant("", np.ascontiguousarray(values))
        old = node.inputs[idx] if idx < len(node.inputs) and node.inputs[idx].name else None
        if idx < len(node.inputs):
            node.inputs[idx] = new
        else:
            node.inputs.extend([gs.Variable.empty()] * (idx - len(node.inputs)) + [new])
        if old is not None:
            self.drop_dead_constant(old)
        free = (
            old is not None
            and not old.outputs
            and id(old) not in self._output_ids
            and (isinstance(old, gs.Constant) or not old.inputs)
        )
        new.name = old.name if free else self.fresh_name(base)
