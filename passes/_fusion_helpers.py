"""Small graph helpers shared by the fusion passes (fuse_* and collapse_reshape_chains).

Private to those passes: reading constant values (initializers or ``Constant`` nodes), checking that a
tensor has one consumer, removing a node, bypassing a tensor, fresh names, and per-channel scaling of
Conv/ConvTranspose weights.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.pass_base import Pass, PassContext, PassResult, iter_graphs

FLOAT_KINDS = "f"


class FusionPass(Pass):
    """Pass base that knows every tensor name in the model, so new constants get unique names."""

    def run(self, ctx: PassContext) -> PassResult:
        self._names: set[str] = set()
        for g in iter_graphs(ctx.graph, functions=self.visit_functions):
            self._names.update(g.tensors().keys())
            self._names.update(n.name for n in g.nodes if n.name)
        return super().run(ctx)

    def fresh_name(self, base: str) -> str:
        names = getattr(self, "_names", set())
        name, i = base, 0
        while name in names:
            i += 1
            name = f"{base}_{i}"
        names.add(name)
        return name

    def new_constant(self, base: str, values: np.ndarray) -> gs.Constant:
        return gs.Constant(self.fresh_name(base), np.ascontiguousarray(values))

    def run_graph(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        # gs.Node.__eq__ compares contents, so membership and removal go by identity.
        self._members = {id(n) for n in graph.nodes}
        self._dead: set[int] = set()
        # A nested body may return an outer value directly as its output; such a value has no reader node.
        self._output_ids = {id(t) for g in iter_graphs(graph) for t in g.outputs}
        try:
            return self.fuse_graph(graph, ctx)
        finally:
            if self._dead:
                graph.nodes = [n for n in graph.nodes if id(n) not in self._dead]

    def fuse_graph(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def per_channel_operand(self, graph: gs.Graph, conv: gs.Node, node: gs.Node, other: gs.Tensor, *,
                            scales_weight: bool = True, kind: str = "per output channel"):
        """``(w, b, cout, vec)`` when ``node`` is the Conv's sole reader and ``other`` a per-output-channel
        constant of the weight's dtype (``vec`` has ``cout`` entries); otherwise the reason it is not."""
        if not self.owns(conv) or self.sole_consumer(graph, conv.outputs[0]) is not node:
            return "the Conv output has other readers"
        c = const_value(other)
        if c is None:
            return f"the other {node.op} input is not a constant"
        got = conv_weights(conv, scales_weight=scales_weight)
        if isinstance(got, str):
            return got
        w, b = got
        if c.dtype != w.dtype:
            return f"{node.op} constant dtype {c.dtype} differs from weight dtype {w.dtype}"
        cout = conv_out_channels(conv.op, w, int(conv.attrs.get("group", 1)))
        vec = channel_vector(c, cout, w.ndim)
        if vec is None:
            return f"{node.op} constant of shape {list(c.shape)} is not {kind}"
        return w, b, cout, vec

    def fuse_into_preceding_conv(self, graph: gs.Graph, ops: tuple[str, ...], fuse, stat, positions=(0, 1)) -> PassResult:
        """Fold each binary ``ops`` node that reads a Conv/ConvTranspose output into that Conv.

        ``fuse(graph, conv, node, other_input)`` rewrites the Conv and returns None, or a reason it refused;
        ``stat(node, conv)`` names the counter; ``positions(node)`` says which inputs may be the Conv's.
        """
        result = PassResult()
        for node in [n for n in graph.nodes if n.op in ops and not n.domain and len(n.inputs) == 2]:
            for i in positions(node) if callable(positions) else positions:
                t, other = node.inputs[i], node.inputs[1 - i]
                if not t.inputs or t.inputs[0].op not in ("Conv", "ConvTranspose") or t.inputs[0].domain:
                    continue
                conv = t.inputs[0]
                reason = fuse(graph, conv, node, other)
                if reason:
                    result.skip(node, f"not fused into {conv.op} '{conv.name}': {reason}", graph)
                    break
                self.remove_node(graph, node)
                result.count(stat(node, conv))
                result.modified = True
                break
        return result

    def owns(self, node: gs.Node) -> bool:
        """True when ``node`` lives in the graph being rewritten (not an outer scope) and is still alive."""
        return id(node) in self._members and id(node) not in self._dead

    def sole_consumer(self, graph: gs.Graph, t: gs.Tensor) -> gs.Node | None:
        """The only node reading ``t`` when ``t`` is no graph output (of this graph or a body in it); else None."""
        if id(t) in self._output_ids or len(t.outputs) != 1:
            return None
        return t.outputs[0]

    def bypass(self, graph: gs.Graph, old: gs.Tensor, new: gs.Tensor) -> bool:
        """Make every reader of ``old`` read ``new``. False when ``old`` is a graph output (keep a node)."""
        if id(old) in self._output_ids:
            return False
        for consumer in list(old.outputs):
            replace_input(consumer, old, new)
        return True

    def outputs_unused(self, node: gs.Node, keep: int = 1) -> bool:
        """True when outputs past the first ``keep`` are read by nobody."""
        return all(not o.outputs and id(o) not in self._output_ids for o in node.outputs[keep:])

    def remove_node(self, graph: gs.Graph, node: gs.Node) -> None:
        """Detach ``node`` and drop it, and any ``Constant`` node left without readers by that."""
        inputs = list(node.inputs)
        node.inputs.clear()
        node.outputs.clear()
        self._dead.add(id(node))
        for t in inputs:
            self.drop_dead_constant(graph, t)

    def drop_dead_constant(self, graph: gs.Graph, t: gs.Tensor | None) -> None:
        """Drop the ``Constant`` node (or Identity-of-constant chain) behind ``t`` once nobody reads ``t``."""
        if isinstance(t, gs.Variable) and not t.outputs and id(t) not in self._output_ids and len(t.inputs) == 1:
            producer = t.inputs[0]
            if not self.owns(producer) or producer.domain:
                return
            if producer.op == "Constant":
                producer.outputs.clear()
                self._dead.add(id(producer))
            elif producer.op == "Identity" and const_value(t) is not None:
                self.remove_node(graph, producer)

    def set_constant_input(self, graph: gs.Graph, node: gs.Node, idx: int, values: np.ndarray, base: str) -> None:
        """Feed ``values`` to input ``idx`` as a new constant (a shared old one is never edited in place).
        The new constant takes the old one's name when nothing else reads the old one any more."""
        new = gs.Constant("", np.ascontiguousarray(values))
        old = node.inputs[idx] if idx < len(node.inputs) and node.inputs[idx].name else None
        if idx < len(node.inputs):
            node.inputs[idx] = new
        else:
            node.inputs.extend([gs.Variable.empty()] * (idx - len(node.inputs)) + [new])
        if old is not None:
            self.drop_dead_constant(graph, old)
        free = (old is not None and not old.outputs and id(old) not in self._output_ids
                and (isinstance(old, gs.Constant) or not old.inputs))
        new.name = old.name if free else self.fresh_name(base)

    def set_conv_weights(self, graph: gs.Graph, node: gs.Node, w: np.ndarray | None, b: np.ndarray | None) -> None:
        """New weight and/or bias for a Conv/ConvTranspose (None leaves that input as it is)."""
        base = node.name or node.op
        if w is not None:
            self.set_constant_input(graph, node, 1, w, f"{base}_W")
        if b is not None:
            self.set_constant_input(graph, node, 2, b, f"{base}_B")

    def grows(self, new: list[np.ndarray | None], replaced: list[gs.Tensor | None]) -> int:
        """Bytes the model would gain: new constants minus this node's share of the replaced ones.

        A constant read by k nodes counts 1/k here, so fusing all k readers (e.g. BNs sharing parameters)
        adds up exactly, while a lone fusion next to a shared weight shows as growth."""
        gained = float(sum(a.nbytes for a in new if a is not None))
        for t in replaced:
            if t is not None and t.name:
                v = const_value(t)
                gained -= (v.nbytes if v is not None else 0) / max(1, len(t.outputs))
        return int(np.ceil(gained))


def const_value(t: gs.Tensor | None) -> np.ndarray | None:
    """Values of an initializer or of a ``Constant`` node's output; None when not constant."""
    # Identity of a constant is that constant (exporters emit these for tied weights).
    for _ in range(8):
        if t is None or isinstance(t, gs.Constant) or len(t.inputs) != 1 or t.inputs[0].op != "Identity":
            break
        t = t.inputs[0].inputs[0] if t.inputs[0].inputs else None
    if t is None:
        return None
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    if len(t.inputs) == 1 and t.inputs[0].op == "Constant" and not t.inputs[0].domain:
        attrs = t.inputs[0].attrs
        if isinstance(attrs.get("value"), gs.Constant):
            return np.asarray(attrs["value"].values)
        for key, dtype in (("value_float", np.float32), ("value_floats", np.float32),
                           ("value_int", np.int64), ("value_ints", np.int64)):
            if key in attrs:
                return np.asarray(attrs[key], dtype=dtype)
    return None


def is_shared(t: gs.Tensor) -> bool:
    """True when some other node also reads this constant (directly or through an Identity chain)."""
    for _ in range(8):
        if len(t.outputs) > 1:
            return True
        if isinstance(t, gs.Constant) or len(t.inputs) != 1 or t.inputs[0].op != "Identity" or not t.inputs[0].inputs:
            return False
        t = t.inputs[0].inputs[0]
    return True


def replace_input(node: gs.Node, old: gs.Tensor, new: gs.Tensor) -> None:
    for i, t in enumerate(node.inputs):
        if t is old:
            node.inputs[i] = new


def channel_vector(values: np.ndarray, channels: int, rank: int) -> np.ndarray | None:
    """A per-output-channel vector [C] from a constant that broadcasts against an [N, C, ...] tensor of
    ``rank`` without growing it (scalar, [C], [C,1,..], [1,C,1,..]); None otherwise."""
    v = np.asarray(values)
    if v.ndim > rank:
        return None
    shape = (1,) * (rank - v.ndim) + v.shape
    if shape[0] != 1 or any(d != 1 for d in shape[2:]) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(v.reshape(-1), (channels,)) if v.size == 1 else v.reshape(channels)


def conv_out_channels(op: str, w: np.ndarray, group: int) -> int:
    return int(w.shape[0]) if op == "Conv" else int(w.shape[1]) * group


def scale_out_channels(op: str, w: np.ndarray, s: np.ndarray, group: int) -> np.ndarray:
    """W scaled per output channel, in float64. Conv: W is [C_out, C_in/g, k...]; ConvTranspose: W is
    [C_in, C_out/g, k...] and output channel g*C_out/g + j reads W[g*C_in/g + i, j]."""
    w64 = w.astype(np.float64)
    tail = (1,) * (w.ndim - 2)
    if op == "Conv":
        return w64 * s.reshape((-1, 1) + tail)
    cin, cout_g = w.shape[0], w.shape[1]
    grouped = w64.reshape((group, cin // group, cout_g) + w.shape[2:])
    scaled = grouped * s.reshape((group, 1, cout_g) + tail)
    return scaled.reshape(w.shape)


def conv_weights(node: gs.Node, scales_weight: bool = True) -> tuple[np.ndarray, np.ndarray | None] | str:
    """(W, bias or None) of a Conv/ConvTranspose, or the reason they are not usable constants."""
    if len(node.inputs) < 2:
        return "no weight input"
    w = const_value(node.inputs[1])
    if w is None:
        return "weight is not a constant"
    if w.dtype.kind not in FLOAT_KINDS or w.ndim < 3:
        return f"weight dtype {w.dtype} / rank {w.ndim} not supported"
    if scales_weight and is_shared(node.inputs[1]):
        # A scaled copy next to the original would make the model bigger.
        return "the weight is shared with another node (fusing would duplicate it)"
    b = None
    if len(node.inputs) > 2 and node.inputs[2].name != "":
        b = const_value(node.inputs[2])
        if b is None:
            return "bias is not a constant"
    group = int(node.attrs.get("group", 1))
    if node.op == "ConvTranspose" and w.shape[0] % group:
        return "weight shape does not match group"
    return w, b


def take_output(dst: gs.Node, src: gs.Node) -> None:
    """``dst`` now produces ``src``'s first output (its own old outputs are dropped); ``src`` keeps none."""
    out = src.outputs[0]
    src.outputs.clear()
    dst.outputs.clear()
    dst.outputs.append(out)
