"""Small graph helpers shared by the fusion passes (fuse_* and collapse_reshape_chains).

Private to those passes: the fusion pass base (one ``GraphEditor`` per graph), folding a per-channel operand
into the preceding Conv, the growth rule, and per-channel scaling of Conv/ConvTranspose weights. Generic
editing (constants behind tensors, rewiring, removing nodes, fresh names) is the core's ``onnxslim.graph_edit``.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim.graph_edit import GraphEditor, const_value, is_shared
from onnxslim.pass_base import Pass, PassContext, PassResult

FLOAT_KINDS = "f"


class FusionPass(Pass):
    """Pass base for rewrites of one graph at a time: ``fuse_graph(edit, ctx)`` gets the graph's editor (names
    unique in the whole model; removed nodes dropped when it returns)."""

    def run_graph(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        with ctx.edit(graph) as edit:
            return self.fuse_graph(edit, ctx)

    def fuse_graph(self, edit: GraphEditor, ctx: PassContext) -> PassResult:
        raise NotImplementedError


def per_channel_operand(
    edit: GraphEditor,
    conv: gs.Node,
    node: gs.Node,
    other: gs.Tensor,
    *,
    scales_weight: bool = True,
    kind: str = "per output channel",
):
    """``(w, b, cout, vec)`` when ``node`` is the Conv's sole reader and ``other`` a per-output-channel
    constant of the weight's dtype (``vec`` has ``cout`` entries); otherwise the reason it is not."""
    if not edit.owns(conv) or edit.sole_consumer(conv.outputs[0]) is not node:
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


def fuse_into_preceding_conv(edit: GraphEditor, ops: tuple[str, ...], fuse, stat, positions=(0, 1)) -> PassResult:
    """Fold each binary ``ops`` node that reads a Conv/ConvTranspose output into that Conv.

    ``fuse(edit, conv, node, other_input)`` rewrites the Conv and returns None, or a reason it refused;
    ``stat(node, conv)`` names the counter; ``positions(node)`` says which inputs may be the Conv's.
    """
    result = PassResult()
    graph = edit.graph
    for node in [n for n in graph.nodes if n.op in ops and not n.domain and len(n.inputs) == 2]:
        for i in positions(node) if callable(positions) else positions:
            t, other = node.inputs[i], node.inputs[1 - i]
            if not t.inputs or t.inputs[0].op not in ("Conv", "ConvTranspose") or t.inputs[0].domain:
                continue
            conv = t.inputs[0]
            reason = fuse(edit, conv, node, other)
            if reason:
                result.skip(node, f"not fused into {conv.op} '{conv.name}': {reason}", graph)
                break
            edit.remove_node(node)
            result.count(stat(node, conv))
            result.modified = True
            break
    return result


def set_conv_weights(edit: GraphEditor, node: gs.Node, w: np.ndarray | None, b: np.ndarray | None) -> None:
    """New weight and/or bias for a Conv/ConvTranspose (None leaves that input as it is)."""
    base = node.name or node.op
    if w is not None:
        edit.set_constant_input(node, 1, w, f"{base}_W")
    if b is not None:
        edit.set_constant_input(node, 2, b, f"{base}_B")


def grows(new: list[np.ndarray | None], replaced: list[gs.Tensor | None]) -> int:
    """Bytes the model would gain: new constants minus this node's share of the replaced ones.

    A constant read by k nodes counts 1/k here, so fusing all k readers (e.g. BNs sharing parameters)
    adds up exactly, while a lone fusion next to a shared weight shows as growth."""
    gained = float(sum(a.nbytes for a in new if a is not None))
    for t in replaced:
        if t is not None and t.name:
            v = const_value(t)
            gained -= (v.nbytes if v is not None else 0) / max(1, len(t.outputs))
    return int(np.ceil(gained))


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
