"""Private helper of quantize_int8_static: decide, node by node, what gets quantized and why not.

A plan names the inputs of one node to quantize: activations (Q/DQ pairs, need calibration ranges),
weights (constant -> int8 + DQ, with the per-channel axis or None) and a bias (int32). Everything not
quantized that a user could expect to be is recorded as a skip with its reason.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxslim.graph_edit import constant_source
from onnxslim.pass_base import PassResult, iter_graphs

from ._ops import OPS, TRANSPARENT, ops_with_role, weight_axis

__all__ = ["NodePlan", "QuantizePlanner"]

_WEIGHTED = ops_with_role("weighted")
_RNN = ops_with_role("recurrent")
_ELEMENTWISE_PASS_THROUGH = ops_with_role("elementwise")
_SINGLE_INPUT_PASS_THROUGH = ops_with_role("single_input")
# Pooling ops onnxruntime runs in int8 (QLinearAveragePool / QLinearGlobalAveragePool) only when their output is
# Q/DQ'd too: their consumers read the quantized output.
_QUANTIZED_OUTPUT_POOLS = frozenset(op for op, q in OPS.items() if q.quantized_output)
_FLOAT = onnx.TensorProto.FLOAT
_MIN_TABLE = 256  # elements


def _dequantized(t: gs.Tensor) -> bool:
    """Produced by DequantizeLinear, or by the Mul(Cast(int8 constant), scale) weight-only encoding."""
    if len(t.inputs) != 1:
        return False
    node = t.inputs[0]
    if node.op == "DequantizeLinear":
        return True
    if node.op != "Mul" or node.domain:
        return False
    for x in node.inputs:
        if len(x.inputs) == 1 and x.inputs[0].op == "Cast" and x.inputs[0].inputs:
            src = x.inputs[0].inputs[0]
            if isinstance(src, gs.Constant) and np.dtype(src.dtype) in (np.int8, np.uint8):
                return True
    return False


@dataclass
class NodePlan:
    graph: gs.Graph
    node: gs.Node
    activations: list[int] = field(default_factory=list)
    weights: list[tuple[int, int | None]] = field(default_factory=list)
    bias: int | None = None
    pass_through: bool = False  # planned by plan_pass_through (re-planned by the ladder, never given rungs)
    macs: int | None = None  # multiply-accumulates per sample (weighted nodes; None = unknown)
    codebook: int | None = None  # input whose weight share_weights decodes from a codebook (quantized there)

    def activation_names(self) -> list[str]:
        return [self.node.inputs[i].name for i in self.activations]


def _is_depthwise(node: gs.Node, weight: gs.Constant | None) -> bool:
    """A Conv with one input channel per group and more than one group (MobileNet's 3x3 / 5x5 layers)."""
    if node.op != "Conv" or weight is None or len(weight.shape) < 3:
        return False
    return int(node.attrs.get("group", 1)) > 1 and int(weight.shape[1]) == 1


class QuantizePlanner:
    def __init__(
        self,
        opts,
        types: dict[str, int],
        per_channel: bool,
        result: PassResult,
        shapes: dict[str, list] | None = None,
        depthwise_int8: bool = True,
    ):
        self.opts, self.types, self.per_channel, self.result = opts, types, per_channel, result
        self.depthwise_int8 = depthwise_int8  # False: depthwise Convs get int8 weights only (slow int8 kernels)
        self.shapes = shapes or {}  # inferred shapes by tensor name (dims are int or None)
        self.min_macs = int(getattr(opts, "min_macs_for_activation_quantization", 0) or 0)
        # Weight-only layers stored as Cast + Mul take a per-channel scale at any opset (Mul broadcasts).
        self.cast_mul = getattr(opts, "weight_only_encoding", "cast_mul") == "cast_mul"
        self.op_types = set(opts.op_types) - set(opts.exclude_op_types)
        self.excluded_nodes = set(opts.exclude_nodes)
        self.seen_ops: Counter = Counter()
        self.owner: dict[int, gs.Graph] = {}
        self.quantized_inputs: set[tuple[int, str]] | None = None  # set by plan()

    # ------------------------------------------------------------------------------------------ queries
    def is_float(self, t: gs.Tensor) -> bool:
        if isinstance(t, gs.Constant):
            return np.dtype(t.dtype) == np.float32
        dtype = getattr(t, "dtype", None)
        if dtype is not None:
            try:
                return np.dtype(dtype) == np.float32
            except TypeError:
                return dtype == _FLOAT
        return self.types.get(t.name) == _FLOAT

    def constant_of(self, t: gs.Tensor) -> tuple[gs.Constant, gs.Node | None, gs.Graph | None] | None:
        """The constant behind ``t`` (itself, or the value of the Constant node producing it), that node, and the
        graph the node lives in."""
        found = constant_source(t, through_identity=False)
        if found is None:
            return None
        return found.constant, found.node, self.owner.get(id(found.node)) if found.node is not None else None

    def float_weight(self, t: gs.Tensor) -> gs.Constant | None:
        found = self.constant_of(t) if t is not None and t.name else None
        if found is None:
            return None
        return found[0] if np.dtype(found[0].dtype) == np.float32 else None

    def activation_ok(self, t: gs.Tensor) -> bool:
        return (
            bool(t.name)
            and not isinstance(t, gs.Constant)
            and self.constant_of(t) is None
            and not _dequantized(t)
            and self.is_float(t)
        )

    # ------------------------------------------------------------------------------------------ planning
    def plan(self, root: gs.Graph) -> list[NodePlan]:
        self.owner = {id(n): g for g in iter_graphs(root) for n in g.nodes}
        plans: list[NodePlan] = []
        for g in iter_graphs(root):
            for node in list(g.nodes):
                self.seen_ops[f"{node.domain}:{node.op}" if node.domain else node.op] += 1
                p = self.plan_node(g, node)
                if p is not None and (p.activations or p.weights):
                    plans.append(p)
        plans.extend(self.plan_pass_through(root, plans))
        self.note_quantized_inputs(plans)
        return plans

    def note_quantized_inputs(self, plans: list[NodePlan]) -> None:
        """Remember which tensors the plans quantize (``layer_output_names`` asks whether a Q follows)."""
        self.quantized_inputs = {(id(p.graph), n) for p in plans for n in p.activation_names()}

    def plan_node(self, g: gs.Graph, node: gs.Node) -> NodePlan | None:
        op = node.op
        if node.domain not in (None, "", "ai.onnx"):
            if any(isinstance(t, gs.Constant) for t in node.inputs) or node.attrs:
                self.result.skip(node, f"op from domain '{node.domain}' has no int8 form; it stays float", g)
            return None
        role = OPS[op].role if op in OPS else None
        if role not in ("weighted", "recurrent", "table"):
            return None
        if op not in self.op_types:
            if role != "table":
                self.result.skip(node, f"op type {op} is excluded (op_types/exclude_op_types)", g)
            return None
        if node.name in self.excluded_nodes:
            self.result.skip(node, "excluded by name (exclude_nodes)", g)
            return None
        return {"weighted": self.plan_weighted, "recurrent": self.plan_rnn, "table": self.plan_gather}[role](g, node)

    def plan_weighted(self, g: gs.Graph, node: gs.Node) -> NodePlan | None:
        op, p = node.op, NodePlan(g, node)
        if len(node.inputs) < 2:
            return None
        x, w = node.inputs[0], node.inputs[1]
        if _dequantized(x) or _dequantized(w):
            self.result.skip(node, "already quantized (its inputs come from DequantizeLinear)", g)
            return None
        if not self.activation_ok(x):
            self.result.skip(
                node, f"input '{x.name}' is not a float32 activation (no inferred float type); it stays float", g
            )
            return None
        p.activations.append(0)
        weight = self.float_weight(w)
        if weight is not None:
            p.weights.append((1, self.weight_axis(node, weight)))
        elif self.codebook_of(w) is not None:
            if not self.per_channel:  # DequantizeLinear's axis (opset 13): an opset-11 file would not load
                self.result.skip(
                    node,
                    "its shared weights stack under int8 with one scale per output channel, which needs opset >= 13 "
                    "and weights_per_channel (e.g. --opset 13); it stays float",
                    g,
                )
                return None
            p.codebook = 1  # shared weights: the codebook becomes int8, the codes stay (stacked compression)
        elif self.gathered_weight(w):
            pass  # Gather(constant table, index): the table is quantized (plan_gather), the node reads it float
        elif op in ("MatMul", "Gemm") and self.activation_ok(w):
            p.activations.append(1)  # activation x activation (attention scores, context)
        else:
            self.result.skip(
                node, f"weight '{w.name}' is neither a float32 constant nor a float activation; the node stays float", g
            )
            return None
        bias = OPS[op].bias
        weighted = weight is not None or p.codebook is not None
        if weighted and bias is not None and bias >= 0 and len(node.inputs) > bias and node.inputs[bias].name:
            b = self.float_weight(node.inputs[bias])
            beta = float(node.attrs.get("beta", 1.0)) if op == "Gemm" else 1.0
            # A Gemm's [1, N] bias broadcasts like [N]: it is written 1-D (int32) so onnxruntime fuses QGemm.
            row = op == "Gemm" and len(b.shape) == 2 and b.shape[0] == 1 if b is not None else False
            if b is not None and (len(b.shape) == 1 or row) and beta == 1.0:
                p.bias = bias
        if weight is None and self.gathered_weight(w):
            gather = w.inputs[0]  # one slice of a stacked table (a Loop body's per-iteration weight)
            table = self.gather_table(gather)
            if int(gather.attrs.get("axis", 0)) == 0 and op in ("MatMul", "Gemm"):
                p.macs = self.macs_per_sample(node, table, skip_leading=1)
        elif weight is not None:
            p.macs = self.macs_per_sample(node, weight)
        elif p.codebook is not None and self.shape_of(w) is not None:
            p.macs = self.macs_per_sample(node, w)
        small = p.macs is not None and p.macs < self.min_macs
        depthwise = not self.depthwise_int8 and _is_depthwise(node, weight)
        if small or depthwise:
            # Cost rules: on a layer this small the Q/DQ of its activation costs more than the int8 kernel
            # saves; a depthwise Conv's int8 kernel is slower than float on the target. int8 weights + float
            # activation still shrink the file.
            p.activations, p.bias = [], None
            self.result.count("layers_weight_only_small" if small else "layers_weight_only_depthwise")
            if weight is not None:
                p.weights = [(1, self.weight_axis(node, weight, weight_only=True))]
        return p

    def layer_output_names(self, p: NodePlan) -> list[str]:
        """The output of a Conv/ConvTranspose with quantized activations, when it can take a Q/DQ pair (a float
        tensor that is no output of its graph): onnxruntime has no integer convolution with a float output, so
        it fuses DQ -> Conv into QLinearConv only when a Q follows (MatMul and Gemm have float-output integer
        kernels, MatMulIntegerToFloat and QGemm, and need no Q)."""
        if (
            OPS.get(p.node.op, None) is None
            or not OPS[p.node.op].needs_output_q
            or not p.activations
            or not p.node.outputs
        ):
            return []
        o = p.node.outputs[0]
        if not o.name or any(o is t for t in p.graph.outputs) or not self.is_float(o):
            return []
        if o.outputs and all(self._q_follows(p.graph, r) for r in o.outputs):
            return []  # Relu/Clip/Reshape... then a quantized reader: its Q serves (ORT drops a Relu before a Q)
        return [o.name]

    def _q_follows(self, g: gs.Graph, reader: gs.Node, depth: int = 0) -> bool:
        """True when ``reader`` is a transparent op whose output only quantized nodes read (through more
        transparent ops; a graph output there counts too, it stays float as before), so the layer needs no Q of
        its own. A Squeeze before a float Add is no such reader (Magika's Conv)."""
        if reader.op not in TRANSPARENT or reader.domain or len(reader.outputs) != 1 or depth > 8:
            return False
        t = reader.outputs[0]
        if not t.outputs or any(t is o for o in g.outputs):
            return True  # a graph output behind it stays float (keep_float_outputs' intent): no Q on the way
        if self.quantized_inputs is None:  # no plan made yet: any transparent reader serves
            return True
        return (id(g), t.name) in self.quantized_inputs or all(self._q_follows(g, r, depth + 1) for r in t.outputs)

    def shape_of(self, t: gs.Tensor) -> list | None:
        shape = getattr(t, "shape", None)
        if shape is None or any(not isinstance(d, (int, np.integer)) for d in shape):
            shape = self.shapes.get(t.name, shape)
        return None if shape is None else list(shape)

    def macs_per_sample(self, node: gs.Node, weight: gs.Constant, skip_leading: int = 0) -> int | None:
        """Weight elements x positions the weight is applied at per sample: Conv/ConvTranspose the output's
        spatial size (None when unknown: the rule is not applied), MatMul the input's static dims between the
        batch and the last axis (unknown dims count 1: a per-row lower bound), Gemm 1."""
        size = int(np.prod(weight.shape[skip_leading:], dtype=np.int64))
        if node.op in ("Conv", "ConvTranspose"):
            out = self.shape_of(node.outputs[0]) if node.outputs else None
            if out is None or len(out) < 3 or any(not isinstance(d, (int, np.integer)) or d <= 0 for d in out[2:]):
                return None
            return size * int(np.prod(out[2:], dtype=np.int64))
        if node.op == "MatMul":
            x = self.shape_of(node.inputs[0])
            rows = [d for d in (x or [])[1:-1] if isinstance(d, (int, np.integer)) and d > 0]
            return size * int(np.prod(rows, dtype=np.int64))
        return size

    def codebook_of(self, t: gs.Tensor) -> tuple[gs.Node, gs.Constant, gs.Node | None] | None:
        """(the Gather, its float codebook, the Mul by channel scales or None) when ``t`` is share_weights'
        decoding of one codebook per tensor: ``[Transpose](Reshape(Gather(codebook[K], codes)))``, or with
        channel scales ``[Transpose](Reshape(Mul(Reshape(Gather(..)), scales[rows, 1])))``, each step read by the
        next alone (the chain is retyped to int8 when the codebook is quantized)."""
        node = t.inputs[0] if len(t.inputs) == 1 else None
        if node is not None and node.op == "Transpose" and len(t.outputs) == 1:
            t = node.inputs[0]
            node = t.inputs[0] if len(t.inputs) == 1 else None
        if node is None or node.op != "Reshape" or node.domain or len(t.outputs) != 1:
            return None
        t = node.inputs[0]
        mul = t.inputs[0] if len(t.inputs) == 1 else None
        if mul is not None and mul.op == "Mul" and not mul.domain:
            scales, grid = mul.inputs[1], mul.inputs[0]
            reshape = grid.inputs[0] if len(grid.inputs) == 1 else None
            if len(t.outputs) != 1 or not isinstance(scales, gs.Constant) or len(scales.outputs) != 1:
                return None
            if len(scales.shape) != 2 or scales.shape[1] != 1 or np.dtype(scales.dtype) != np.float32:
                return None
            if reshape is None or reshape.op != "Reshape" or reshape.domain or len(grid.outputs) != 1:
                return None
            t = reshape.inputs[0]
        else:
            mul = None
        gather = t.inputs[0] if len(t.inputs) == 1 else None
        if gather is None or gather.op != "Gather" or gather.domain or len(t.outputs) != 1:
            return None
        if int(gather.attrs.get("axis", 0)) != 0 or isinstance(gather.inputs[1], gs.Constant):
            return None  # constant codes would be a plain constant weight, folded before this pass
        codebook = gather.inputs[0]
        if not isinstance(codebook, gs.Constant) or len(codebook.shape) != 1 or len(codebook.outputs) != 1:
            return None
        if np.dtype(codebook.dtype) != np.float32 or not 2 <= codebook.shape[0] <= 256:
            return None
        return gather, codebook, mul

    def gathered_weight(self, t: gs.Tensor) -> bool:
        src = t.inputs[0] if len(t.inputs) == 1 else None
        return (
            src is not None
            and src.op == "Gather"
            and not src.domain
            and "Gather" in self.op_types
            and self.gather_table(src) is not None
        )

    def gather_table(self, node: gs.Node) -> gs.Constant | None:
        table = self.float_weight(node.inputs[0]) if node.inputs else None
        if table is None or len(table.shape) < 2 or int(np.prod(table.shape, dtype=np.int64)) < _MIN_TABLE:
            return None  # small or 1-D tables (per-layer biases) save nothing worth their accuracy
        return table

    def weight_only_per_channel(self) -> bool:
        return self.per_channel or self.cast_mul

    def weight_axis(self, node: gs.Node, w: gs.Constant, weight_only: bool = False) -> int | None:
        if not (self.per_channel or (weight_only and self.cast_mul)):
            return None
        return weight_axis(node, len(w.shape))

    def plan_rnn(self, g: gs.Graph, node: gs.Node) -> NodePlan | None:
        # Weight-only: onnxruntime has no QDQ RNN kernels; the int8 weights still shrink the file.
        p = NodePlan(g, node)
        for i in OPS[node.op].weights:
            w = self.float_weight(node.inputs[i]) if i < len(node.inputs) else None
            if w is not None:
                p.weights.append((i, weight_axis(node, len(w.shape)) if self.weight_only_per_channel() else None))
        if not p.weights:
            self.result.skip(node, "W/R are not float32 constants; the node stays float", g)
        return p

    def plan_gather(self, g: gs.Graph, node: gs.Node) -> NodePlan | None:
        # Embedding tables (and stacked per-layer weights): int8 table -> DQ -> Gather.
        table = self.gather_table(node)
        if table is None:
            return None
        axis = weight_axis(node, len(table.shape)) if self.weight_only_per_channel() else None
        return NodePlan(g, node, weights=[(0, axis)])

    def plan_pass_through(self, root: gs.Graph, plans: list[NodePlan]) -> list[NodePlan]:
        """Add/Mul/Concat/pooling/Resize whose inputs come from quantized nodes: Q/DQ on them lets the runtime
        keep the whole chain in int8. Inputs produced elsewhere (masks, positional terms) stay float: their
        ranges are unrelated to the data path and would cost accuracy. Constant operands (a BatchNorm left
        after an activation as Mul + Add, as Keras exports have) stay float too: quantized per tensor they
        make onnxruntime run QLinearMul/QLinearAdd with per-channel broadcasts, which was slower than float
        (tf2onnx Keras CNN: int8/fp32 latency 1.00 -> 1.67 @1t, measured)."""
        planned_nodes = {id(p.node) for p in plans if p.activations}
        planned_acts = {(id(p.graph), n) for p in plans for n in p.activation_names()}
        out: list[NodePlan] = []
        wanted = self.op_types & (_ELEMENTWISE_PASS_THROUGH | _SINGLE_INPUT_PASS_THROUGH)
        for g in iter_graphs(root):
            for node in g.nodes:
                if node.op not in wanted or node.domain or node.name in self.excluded_nodes:
                    continue
                idx = [0] if node.op in _SINGLE_INPUT_PASS_THROUGH else list(range(len(node.inputs)))
                ins = [node.inputs[i] for i in idx if i < len(node.inputs)]
                if not ins or not all(self.activation_ok(t) for t in ins):
                    continue

                def adjacent(t: gs.Tensor, depth: int = 0, g: gs.Graph = g) -> bool:
                    if (id(g), t.name) in planned_acts or any(id(n) in planned_nodes for n in t.inputs):
                        return True
                    src = t.inputs[0] if len(t.inputs) == 1 else None
                    return (
                        src is not None
                        and src.op in TRANSPARENT
                        and not src.domain
                        and depth < 8
                        and bool(src.inputs)
                        and adjacent(src.inputs[0], depth + 1)
                    )

                if not all(adjacent(t) for t in ins):
                    continue
                p = NodePlan(g, node, activations=idx, pass_through=True)
                out.append(p)
                planned_nodes.add(id(node))
                planned_acts.update((id(g), t.name) for t in ins)
                if node.op in _QUANTIZED_OUTPUT_POOLS:
                    out.extend(self.plan_pool_output(g, node, planned_nodes, planned_acts))
        return out

    def plan_pool_output(self, g: gs.Graph, node: gs.Node, planned_nodes: set, planned_acts: set) -> list[NodePlan]:
        """Q/DQ on an average pool's output (read by all its consumers): with the Q/DQ already on its input,
        onnxruntime fuses DQ -> pool -> Q into QLinear(Global)AveragePool."""
        o = node.outputs[0] if node.outputs else None
        if o is None or not self.activation_ok(o) or o in g.outputs or (id(g), o.name) in planned_acts:
            return []
        out = []
        for c in list(o.outputs):
            if id(c) in planned_nodes or c.op in ("QuantizeLinear", "DequantizeLinear"):
                continue  # a planned consumer quantizes its own inputs
            idx = [i for i, t in enumerate(c.inputs) if t is o]
            if idx:
                out.append(NodePlan(g, c, activations=idx, pass_through=True))
        if out:
            planned_acts.add((id(g), o.name))
        return out

    def nothing_reason(self) -> str:
        ops = ", ".join(f"{k} x{v}" for k, v in sorted(self.seen_ops.items())) or "no nodes"
        reasons = sorted({s.reason for s in self.result.skipped})
        if any(r.startswith("already quantized") for r in reasons):
            return "the model is already quantized (weighted nodes read DequantizeLinear outputs)"
        tail = f" ({'; '.join(reasons[:3])})" if reasons else ""
        return f"no float32 Conv/ConvTranspose/MatMul/Gemm/LSTM/GRU/RNN/Gather weights found among: {ops}{tail}"
