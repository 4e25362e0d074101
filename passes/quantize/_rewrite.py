"""Private helper of quantize_int8_static: the graph rewrite that applies the plans.

Activations get QuantizeLinear -> DequantizeLinear pairs (one per tensor and graph); weights become int8 constants
decoded by DequantizeLinear, or by Cast + Mul for weights-only layers (see the pass's docstring); Conv/Gemm
biases become int32 (``scale = s_x * s_w``); the float weights nobody reads any more are removed.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxslim.graph_edit import peek_values, replace_input
from onnxslim.pass_base import PassContext, PassResult, iter_graphs

from ._bias_correction import shift_bias, weight_error_shift
from ._codebook_int8 import stack_codebook
from ._gptq import WeightQuantizer
from ._math import WEIGHT_QMAX, quantize_bias
from ._plan import NodePlan, QuantizePlanner

__all__ = ["Rewriter"]


class Rewriter:
    """Applies plans: Q/DQ pairs on activations, int8 weights + DQ, int32 biases."""

    weight_qmax: int = WEIGHT_QMAX  # 63 with reduce_range (set by the pass)
    weights: WeightQuantizer | None = None  # rounding shared with bias correction (set by the pass)
    # Shared weights stacked under int8 (set by the pass from its calibration run): the Gram of a layer's input
    # (activation name -> H, for the tables' rounding) and its channel means (for their bias correction).
    codebook_grams: dict | None = None
    codebook_means: dict | None = None

    def __init__(self, ctx: PassContext, result: PassResult, qparams, opts, types: dict[str, int]):
        self.ctx, self.result, self.qparams, self.opts, self.types = ctx, result, qparams, opts, types
        # Nodes the precision ladder keeps at float activations (weight_only/float rungs): a layer output they read
        # stays float (and that layer unfused) rather than feeding them quantized values.
        self.float_readers: set[int] = set()
        self.names = ctx.names  # unique in the whole model, shared with the rest of the pass run
        self.act_cache: dict[tuple[int, str], gs.Variable] = {}
        self.made: dict[int, str] = {}  # id of a DQ output this rewriter made -> the activation it stands for
        self.weight_cache: dict[tuple[int, int, int | None], tuple[gs.Variable, np.ndarray]] = {}
        self.int8_cache: dict[
            tuple[int, int | None, int | None], tuple[gs.Constant, gs.Constant, gs.Constant, list]
        ] = {}
        self.replaced: dict[int, tuple[gs.Constant, gs.Node | None, gs.Graph | None]] = {}

    def fresh(self, base: str) -> str:
        return self.names.fresh(base)

    def apply(self, plans: list[NodePlan], planner: QuantizePlanner) -> None:
        for p in plans:
            x_scales: dict[int, np.float32] = {}
            for i in p.activations:
                t = p.node.inputs[i]
                if id(t) in self.made:  # already rewired by another plan of this node (pool output + Concat)
                    x_scales[i] = self.qparams[self.made[id(t)]][0]
                    continue
                if t.name not in self.qparams:
                    self.result.skip(
                        p.node,
                        f"input '{t.name}' has no calibration statistics (not reached by the "
                        "calibration data); it stays float",
                        p.graph,
                    )
                    continue
                p.node.inputs[i] = self.dequantized_activation(p.graph, t)
                x_scales[i] = self.qparams[t.name][0]
            w_scale = None
            weight_only = not x_scales
            cast_mul = weight_only and self.opts.weight_only_encoding == "cast_mul"
            # A weight-only node in a subgraph gets its own int8 copy there: onnxruntime (1.32) turns
            # DQ(int8 weight) -> MatMul/Gemm with a float input into MatMulNBits and fails to load the model
            # when that weight is an outer-scope initializer ("Missing required weight").
            local = p.graph is not self.ctx.graph and weight_only and not cast_mul
            # Weight-only tables and Cast+Mul weights of subgraph nodes are decoded once in the main graph (outer
            # scope): in a Loop body a DQ would run every iteration (wine_ifloop: latency ratio 1.185 -> 1.151
            # @1t), and onnxruntime constant-folds Cast+Mul only where the int8 tensor is an initializer.
            home = self.ctx.graph if weight_only and (cast_mul or p.node.op == "Gather") else p.graph
            for i, axis in p.weights:
                const, const_node, owner = planner.constant_of(p.node.inputs[i])
                dq, w_scale = self.dequantized_weight(
                    home, p.node, const, axis, local and home is p.graph, cast_mul=cast_mul
                )
                self.replaced[id(const)] = (const, const_node, owner)
                p.node.inputs[i] = dq
            if p.codebook is not None and x_scales:
                w_scale = self.codebook_weight(p, planner)
            if p.bias is not None and w_scale is not None and 0 in x_scales:
                const, const_node, owner = planner.constant_of(p.node.inputs[p.bias])
                if self.quantize_bias(p, const, x_scales[0], w_scale):
                    self.replaced[id(const)] = (const, const_node, owner)
        if getattr(self.opts, "quantize_layer_outputs", False):
            self.quantize_layer_outputs(plans, planner)
        if not self.opts.keep_float_outputs:
            self.quantize_outputs(plans)
        self.remove_float_weights()

    # -------------------------------------------------------------------------------- activations
    def dequantized_activation(self, graph: gs.Graph, t: gs.Tensor) -> gs.Variable:
        key = (id(graph), t.name)
        if key in self.act_cache:
            return self.act_cache[key]
        scale, zp = self.qparams[t.name]
        base = t.name
        s = gs.Constant(self.fresh(f"{base}_scale"), np.array(scale, dtype=np.float32))
        z = gs.Constant(self.fresh(f"{base}_zero_point"), zp)
        q = gs.Variable(self.fresh(f"{base}_quantized"), dtype=zp.dtype, shape=t.shape)
        dq = gs.Variable(self.fresh(f"{base}_dequantized"), dtype=np.float32, shape=t.shape)
        graph.nodes.append(
            gs.Node("QuantizeLinear", self.fresh(f"{base}_QuantizeLinear"), inputs=[t, s, z], outputs=[q])
        )
        graph.nodes.append(
            gs.Node("DequantizeLinear", self.fresh(f"{base}_DequantizeLinear"), inputs=[q, s, z], outputs=[dq])
        )
        self.act_cache[key] = dq
        self.made[id(dq)] = t.name
        self.result.count("activations_quantized")
        return dq

    def quantize_layer_outputs(self, plans: list[NodePlan], planner: QuantizePlanner) -> None:
        """Every reader of a quantized layer's output reads it through one Q/DQ pair (made here, or the one a
        quantized reader already made), so onnxruntime sees DQ -> layer -> Q and fuses it into an integer kernel."""
        planner.note_quantized_inputs(plans)  # the final plans (the ladder may have moved some to float)
        for p in plans:
            if not any(id(p.node.inputs[i]) in self.made for i in p.activations if i < len(p.node.inputs)):
                continue  # its activations stayed float (no calibration statistics): nothing to fuse
            for name in planner.layer_output_names(p):
                o = p.node.outputs[0]
                if name not in self.qparams or any(id(r) in self.float_readers for r in o.outputs):
                    continue
                dq = self.dequantized_activation(p.graph, o)
                for reader in list(o.outputs):
                    if reader.op == "QuantizeLinear" and any(t is o for t in reader.inputs[:1]):
                        continue  # the pair's own Q
                    replace_input(reader, o, dq)
                self.result.count("layer_outputs_quantized")

    def quantize_outputs(self, plans: list[NodePlan]) -> None:
        """keep_float_outputs=false: Q/DQ between a quantized node and the main graph output it produces."""
        main = self.ctx.graph
        for p in plans:
            if p.graph is not main or not p.activations:
                continue
            for k, out in enumerate(p.node.outputs):
                if out not in main.outputs or out.name not in self.qparams:
                    continue
                inner = gs.Variable(self.fresh(f"{out.name}_float"), dtype=out.dtype, shape=out.shape)
                p.node.outputs[k] = inner
                scale, zp = self.qparams[out.name]
                s = gs.Constant(self.fresh(f"{out.name}_scale"), np.array(scale, dtype=np.float32))
                z = gs.Constant(self.fresh(f"{out.name}_zero_point"), zp)
                q = gs.Variable(self.fresh(f"{out.name}_quantized"), dtype=zp.dtype, shape=out.shape)
                main.nodes.append(
                    gs.Node(
                        "QuantizeLinear", self.fresh(f"{out.name}_QuantizeLinear"), inputs=[inner, s, z], outputs=[q]
                    )
                )
                main.nodes.append(
                    gs.Node(
                        "DequantizeLinear", self.fresh(f"{out.name}_DequantizeLinear"), inputs=[q, s, z], outputs=[out]
                    )
                )
                self.result.count("outputs_quantized")

    # -------------------------------------------------------------------------------- weights
    def dequantized_weight(
        self,
        graph: gs.Graph,
        node: gs.Node,
        const: gs.Constant,
        axis: int | None,
        local: bool = False,
        cast_mul: bool = False,
    ) -> tuple[gs.Variable, np.ndarray]:
        key = (id(graph), id(const), axis, cast_mul)
        if key in self.weight_cache:
            return self.weight_cache[key]
        # The int8 constants are made once per weight: a weight read in several subgraphs (If branches) gets a
        # DQ in each, and the export stores the shared int8 tensor once, in the enclosing graph.
        ckey = (id(const), axis, id(graph) if local else None)
        if ckey not in self.int8_cache:
            w = peek_values(const)
            if self.weights is None:
                self.weights = WeightQuantizer(self.weight_qmax)
            q, scale = self.weights.quantize(w, axis)
            base = const.name
            self.int8_cache[ckey] = (
                gs.Constant(self.fresh(f"{base}_int8"), q),
                gs.Constant(self.fresh(f"{base}_scale"), scale),
                # explicit zero points: onnxruntime's QGemm fusion needs them
                gs.Constant(self.fresh(f"{base}_zero_point"), np.zeros(scale.shape, np.int8)),
                list(w.shape),
            )
            self.result.count("weights_quantized")
            self.result.count("weight_bytes_int8", q.nbytes + scale.nbytes + scale.size)
        qc, sc, zc, shape = self.int8_cache[ckey]
        dq = gs.Variable(self.fresh(f"{const.name}_dequantized"), dtype=np.float32, shape=shape)
        if cast_mul:
            self.cast_mul_weight(graph, const.name, qc, sc, axis, dq)
            self.weight_cache[key] = (dq, sc.values)
            return dq, sc.values
        attrs = {"axis": int(axis)} if axis is not None else {}
        graph.nodes.append(
            gs.Node(
                "DequantizeLinear",
                self.fresh(f"{const.name}_DequantizeLinear"),
                attrs=attrs,
                inputs=[qc, sc, zc],
                outputs=[dq],
            )
        )
        self.weight_cache[key] = (dq, sc.values)
        return dq, sc.values

    def codebook_weight(self, p: NodePlan, planner: QuantizePlanner) -> np.ndarray | None:
        """A shared weight stacked under int8 (``_codebook_int8``): int8 codebooks per output channel behind
        DequantizeLinear, the b-bit codes kept. Returns the per-channel weight scales (None: left float)."""
        gather, codebook, mul = planner.codebook_of(p.node.inputs[p.codebook])
        x = self.made.get(id(p.node.inputs[0]), p.node.inputs[0].name)  # the float activation (now behind Q/DQ)
        hessian = (self.codebook_grams or {}).get(x)
        damping = float(getattr(self.opts, "gptq_damping", 0.01))
        got = stack_codebook(
            p.graph, p.node, p.codebook, gather, codebook, mul, self.weight_qmax, self.ctx.opset, self.fresh,
            hessian, damping,
        )  # fmt: skip
        if got is None:
            self.result.skip(
                p.node, "its shared weights' decoding is not one this pass can stack; it stays float", p.graph
            )
            return None
        scale = got.scale
        mu = (self.codebook_means or {}).get(x)
        if mu is not None:
            delta = weight_error_shift(p.node, got.error, np.asarray(mu, np.float64))
            if delta is not None:
                shift_bias(self.ctx, p, planner, delta, self.result, in_place=False)
        if hessian is not None:
            self.result.count("codebook_tables_gptq_rounded")
        self.replaced[id(codebook)] = (codebook, None, None)
        self.result.count("weights_quantized")
        self.result.count("codebook_weights_quantized")
        self.result.count("weight_bytes_int8", int(codebook.values.size * scale.size + 5 * scale.size))
        return scale

    def cast_mul_weight(
        self, graph: gs.Graph, base: str, qc: gs.Constant, sc: gs.Constant, axis: int | None, out: gs.Variable
    ) -> None:
        """out = float(int8) * scale, the scale shaped to broadcast along ``axis``: the same values as
        DequantizeLinear, at any opset, and a pure function of initializers, so onnxruntime folds it into a
        float weight when the session loads."""
        scale = sc.values
        if axis is not None and scale.ndim == 1:
            shape = [1] * len(qc.shape)
            shape[axis] = -1
            scale = scale.reshape(shape)
        s = gs.Constant(self.fresh(f"{base}_scale_broadcast"), np.ascontiguousarray(scale, dtype=np.float32))
        cast = gs.Variable(self.fresh(f"{base}_int8_as_float"), dtype=np.float32, shape=list(qc.shape))
        graph.nodes.append(
            gs.Node(
                "Cast", self.fresh(f"{base}_Cast"), attrs={"to": onnx.TensorProto.FLOAT}, inputs=[qc], outputs=[cast]
            )
        )
        graph.nodes.append(gs.Node("Mul", self.fresh(f"{base}_Mul"), inputs=[cast, s], outputs=[out]))

    def quantize_bias(self, p: NodePlan, b_t: gs.Constant, x_scale: np.float32, w_scale: np.ndarray) -> bool:
        b = peek_values(b_t).astype(np.float32)
        if p.node.op == "Gemm" and b.ndim == 2 and b.shape[0] == 1:
            b = b.reshape(-1)  # [1, N] broadcasts over the rows as [N] does
        if b.ndim != 1 or (w_scale.ndim == 1 and b.shape[0] != w_scale.shape[0]):
            self.result.skip(
                p.node,
                f"bias '{b_t.name}' shape {list(b.shape)} does not match the weight channels; it stays float",
                p.graph,
            )
            return False
        got = quantize_bias(b, x_scale, w_scale)
        if got is None:
            self.result.skip(p.node, f"bias '{b_t.name}' would overflow int32; it stays float", p.graph)
            return False
        q, scale = got
        base = b_t.name
        qc = gs.Constant(self.fresh(f"{base}_int32"), q)
        sc = gs.Constant(self.fresh(f"{base}_scale"), scale)
        dq = gs.Variable(self.fresh(f"{base}_dequantized"), dtype=np.float32, shape=list(b.shape))
        attrs = {"axis": 0} if scale.ndim == 1 else {}
        # No zero point (it defaults to 0): an int32 one per channel would cost as much as the bias itself
        # (mobilenet-style depthwise layers: 9 weight bytes per channel), and onnxruntime fuses either way.
        p.graph.nodes.append(
            gs.Node(
                "DequantizeLinear", self.fresh(f"{base}_DequantizeLinear"), attrs=attrs, inputs=[qc, sc], outputs=[dq]
            )
        )
        p.node.inputs[p.bias] = dq
        self.result.count("biases_quantized")
        self.result.count("weight_bytes_int8", q.nbytes + scale.nbytes)  # int32 values + float scale
        return True

    def remove_float_weights(self) -> None:
        """Drop Constant nodes whose float weight nobody reads any more; count the bytes the file loses."""
        saved = 0
        for const, const_node, owner in self.replaced.values():
            if const_node is not None:
                out = const_node.outputs[0]
                if out.outputs or any(out is o for g in iter_graphs(self.ctx.graph) for o in g.outputs):
                    continue
                owner.nodes.remove(const_node)
                const_node.outputs.clear()
            elif _still_read(self.ctx.graph, const):
                continue
            saved += int(np.prod(const.shape, dtype=np.int64)) * 4
        self.result.count("bytes_saved", saved - self.result.stats.pop("weight_bytes_int8", 0))


def _still_read(root: gs.Graph, const: gs.Constant) -> bool:
    for g in iter_graphs(root):
        if any(any(t is const for t in n.inputs) for n in g.nodes) or any(t is const for t in g.outputs):
            return True
    return False
