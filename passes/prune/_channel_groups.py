"""Private helper of prune_channels: which channels must be removed together (the dependency analysis).

Every tensor that carries removable channels gets a *space*: its channel axis and one element id per channel.
Ops tie elements with a union-find: a pass-through op ties channel i of its input to channel i of its output, a
residual Add/Mul ties both sides, Concat/Split tie by offsets, a grouped/depthwise Conv ties the channels of each
of its groups, Flatten/Reshape into a Gemm ties a channel to its spatial block. A *unit* (one union-find class) is
removed as a whole; a *group* (spaces connected by units) is pruned at one fraction, or left alone when anything
in it cannot follow (``reasons``). Spaces start only at the outputs of Conv / ConvTranspose / Gemm / MatMul with
a constant float weight: the layers whose output channels can be deleted.

Edits are data, applied later: ``Edit`` = delete the removed channels of a space along one axis of a constant
input; ``Fixup`` = Split sizes, Reshape / Resize shape entries, Conv group counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.graph_edit import constant_source

__all__ = ["Space", "Edit", "Fixup", "Group", "Analysis", "attr", "float_const", "mono", "prod"]

_FLOATS = (np.float32, np.float16, np.float64)


@dataclass(eq=False)
class Space:
    """The channels of one tensor: ``size`` elements along ``axis`` of a rank-``rank`` tensor."""

    tensor: gs.Variable
    axis: int
    rank: int
    size: int
    base: int  # element id of channel 0
    index: int  # position in Analysis.spaces


@dataclass(eq=False)
class Edit:
    """Delete the removed channels of ``space`` along ``axis`` of constant input ``input`` of ``node``.
    role: "out" (a layer's output channels: importance), "in" (a layer's input channels: refit), "grouped"
    (a grouped Conv's rows), "bias", "param" (BatchNormalization, per-channel operands)."""

    node: gs.Node
    input: int
    axis: int
    space: int
    role: str
    optional: bool = False  # the input may be absent (recovery may add a bias)


@dataclass(eq=False)
class Fixup:
    """A non-weight edit. kind: "split" (sizes from ``spaces``), "reshape" / "resize" (entry ``entry`` of
    input ``input`` becomes the kept size of ``spaces[0]``), "group" (attr = kept of ``spaces[0]`` / divisor)."""

    kind: str
    node: gs.Node
    spaces: tuple[int, ...]
    input: int = 0
    entry: int = 0
    divisor: int = 1


@dataclass(eq=False)
class Group:
    spaces: list[int]
    units: dict[int, list[tuple[int, int]]]  # unit root -> [(space index, channel)]
    reasons: list[str] = field(default_factory=list)
    edits: list[Edit] = field(default_factory=list)
    fixups: list[Fixup] = field(default_factory=list)


def attr(node: gs.Node, name: str, default):
    v = node.attrs.get(name, default)
    return v.decode() if isinstance(v, bytes) else v


def float_const(t: gs.Tensor | None):
    """The ConstantSource of a float constant, else None."""
    src = constant_source(t) if t is not None and t.name else None
    if src is None or np.dtype(src.constant.dtype) not in [np.dtype(f) for f in _FLOATS]:
        return None
    return src


def mono(d, negative_is_symbol: bool = False) -> tuple[int, tuple[str, ...]] | None:
    """A dim as (factor, symbols) for symbolic products; a negative dim_value (some exporters write -1 for the
    batch) counts as one more unknown symbol when asked."""
    if isinstance(d, (int, np.integer)) and d >= 0:
        return int(d), ()
    if isinstance(d, str) and d:
        return 1, (d,)
    if negative_is_symbol and isinstance(d, (int, np.integer)):
        return 1, ("?",)
    return None


def prod(dims) -> tuple[int, tuple[str, ...]] | None:
    n, syms = 1, []
    for d in dims:
        if d is None:
            return None
        n *= d[0]
        syms.extend(d[1])
    return n, tuple(sorted(syms))


class Analysis:
    """Walk the main graph once (topological order) and build spaces, unions, edits and blocked reasons."""

    def __init__(self, graph: gs.Graph, opset: int, types: dict):
        self.graph, self.opset, self.types = graph, opset, types
        self.spaces: list[Space] = []
        self._by_tensor: dict[int, Space] = {}
        self.parent: list[int] = []
        self.edits: list[Edit] = []
        self.fixups: list[Fixup] = []
        self.reasons: dict[int, list[str]] = {}
        self._outputs = {id(t) for t in graph.outputs}

    # ------------------------------------------------------------------------------------------ basics
    def find(self, x: int) -> int:
        p = self.parent
        root = x
        while p[root] != root:
            root = p[root]
        while p[x] != root:
            p[x], x = root, p[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def used(self, t: gs.Tensor) -> bool:
        """True when some node or the graph's outputs read ``t``."""
        return bool(t.outputs) or id(t) in self._outputs

    def space_of(self, t: gs.Tensor | None) -> Space | None:
        return self._by_tensor.get(id(t)) if t is not None else None

    def dims(self, t: gs.Tensor) -> list | None:
        src = constant_source(t)
        if src is not None:
            return [int(d) for d in src.constant.shape]
        found = self.types.get(t.name)
        if found is not None and found[1] is not None:
            return list(found[1])
        return list(t.shape) if t.shape is not None else None

    def rank(self, t: gs.Tensor) -> int | None:
        d = self.dims(t)
        return len(d) if d is not None else None

    def new_space(self, t: gs.Tensor, axis: int, rank: int, size: int) -> Space:
        s = Space(t, axis, rank, size, len(self.parent), len(self.spaces))
        self.parent.extend(range(s.base, s.base + size))
        self.spaces.append(s)
        self._by_tensor[id(t)] = s
        d = self.dims(t)
        if d is not None and (len(d) != rank or (isinstance(d[axis], int) and d[axis] != size)):
            self.block(s, f"'{t.name}' has shape {d}, not {size} channels on axis {axis} as the analysis expects")
        return s

    def derive(self, t: gs.Tensor, src: Space, axis: int | None = None, rank: int | None = None) -> Space:
        """A space for ``t`` whose channel i is channel i of ``src`` (a pass-through)."""
        out = self.new_space(t, src.axis if axis is None else axis, src.rank if rank is None else rank, src.size)
        self.tie(src, out)
        return out

    def tie(self, a: Space, b: Space, offset: int = 0) -> None:
        """Channel i of ``a`` is channel offset + i of ``b``."""
        for i in range(a.size):
            self.union(a.base + i, b.base + offset + i)

    def block(self, s: Space, reason: str) -> None:
        self.reasons.setdefault(s.index, []).append(reason)

    def edit(self, node: gs.Node, i: int, axis: int, s: Space, role: str, optional: bool = False) -> None:
        self.edits.append(Edit(node, i, axis, s.index, role, optional))

    # ------------------------------------------------------------------------------------------ walk
    def run(self, handler_of) -> Analysis:
        """``handler_of(op)``: the rule of an op (``_channel_rules.handler_of``), None for ops it does not follow."""
        graph = self.graph
        visited = {id(n) for n in graph.nodes}
        for node in graph.nodes:
            ins = [self.space_of(t) for t in node.inputs]
            handler = None if node.domain not in (None, "", "ai.onnx") else handler_of(node.op)
            if handler is None and all(s is None for s in ins):
                continue
            claimed = handler(self, node, ins) if handler is not None else set()
            for i, s in enumerate(ins):
                if s is not None and i not in claimed:
                    self.block(s, f"read by {node.op} '{node.name}', which the analysis does not follow")
        for s in self.spaces:
            if id(s.tensor) in self._outputs:
                self.block(s, f"'{s.tensor.name}' is a graph output")
            if any(id(c) not in visited for c in s.tensor.outputs):
                self.block(s, f"'{s.tensor.name}' is read inside a subgraph")
        return self

    def groups(self) -> list[Group]:
        """Connected spaces as groups, in graph order, with their units, edits and reasons."""
        owner: dict[int, int] = {}
        sp = list(range(len(self.spaces)))

        def sfind(x: int) -> int:
            while sp[x] != x:
                sp[x] = sp[sp[x]]
                x = sp[x]
            return x

        roots: list[np.ndarray] = []
        for s in self.spaces:
            r = np.fromiter((self.find(s.base + i) for i in range(s.size)), dtype=np.int64, count=s.size)
            roots.append(r)
            for root in np.unique(r).tolist():
                if root in owner:
                    a, b = sfind(owner[root]), sfind(s.index)
                    if a != b:
                        sp[max(a, b)] = min(a, b)
                else:
                    owner[root] = s.index
        by_root: dict[int, Group] = {}
        for s in self.spaces:
            g = by_root.setdefault(sfind(s.index), Group([], {}))
            g.spaces.append(s.index)
            for i, root in enumerate(roots[s.index].tolist()):
                g.units.setdefault(root, []).append((s.index, i))
            g.reasons.extend(self.reasons.get(s.index, []))
        for e in self.edits:
            by_root[sfind(e.space)].edits.append(e)
        for f in self.fixups:
            by_root[sfind(f.spaces[0])].fixups.append(f)
        return list(by_root.values())
