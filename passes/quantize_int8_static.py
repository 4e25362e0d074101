"""quantize_int8_static: static int8 post-training quantization written in QDQ form (lossy).

For each quantized node input the graph gets ``x -> QuantizeLinear(s, zp) -> DequantizeLinear(s, zp) -> node``
(activations: affine uint8 by default, ``s = (hi - lo) / 255`` from ranges calibrated on ``ctx.calibration``
with ``onnxslim.calibration.collect_statistics``), and weights become int8 constants followed by a
DequantizeLinear (symmetric, per output channel: Conv axis 0, ConvTranspose axis 1, Gemm axis 0 when transB
else 1, MatMul the last axis, LSTM/GRU/RNN axis 1, Gather the gather axis). The float weights are removed,
so the file shrinks about 4x. Conv/Gemm biases become int32 with ``scale = s_x * s_w`` (zero point 0), the
placement onnxruntime fuses into QLinearConv / QGemm / QLinearMatMul.

Preconditions: opset >= 10 (QuantizeLinear); per-channel weights need opset >= 13 (the ``axis`` attribute),
older models get per-tensor weights. Only float32 tensors are quantized; ops of other domains and tensors
without an inferred float type stay float (recorded as skips). Nodes inside If/Loop/Scan bodies are
quantized too; weights may be initializers, Constant nodes, or outer-scope constants.
Activation ranges: ``range_method=auto`` is minmax. On the sample models minmax, percentile (99.999) and mse
gave the same accuracy and logits cosine within 1e-5 of each other, entropy was worse (cosine 0.954 on
cnn_digits); minmax needs no histograms, so it is the default.
Hardware (``target``, see ``_quantize_hardware``): x86 without VNNI gets 7-bit weights (reduce_range; u8s8
AVX2 kernels saturate int16 pair sums otherwise), ARM gets int8 (s8s8) activations; ``auto`` = this machine.
Bias correction (``_quantize_bias_correction``): each quantized Conv/Gemm/MatMul(+Add) bias is shifted by
``-(W_q - W) E[x]`` with ``E[x]`` the calibrated per-channel input mean. Measured (x86-vnni, 450 eval samples):
cnn_digits mean |logit error| 0.0421 -> 0.0274 (cosine 0.999925 -> 0.999967); transformer_text, gru_digits,
wine_ifloop within +-1% of uncorrected; accuracy unchanged on all four. On by default.
Cost rules (onnxruntime CPU, measured as int8/fp32 latency @1 thread): AveragePool/GlobalAveragePool after a
quantized producer get Q/DQ on their input and output, which onnxruntime fuses into QLinear(Global)AveragePool
(cnn_digits 0.658 -> 0.639, the same as ORT quantize_static). Conv/MatMul/Gemm layers below
``min_macs_for_activation_quantization`` multiply-accumulates per sample (weight elements x output positions;
default 1024) get int8 weights only: their activation Q/DQ costs more than the int8 kernel saves. On wine_ifloop
(13x16 layers in If/Loop bodies) 1.23 (all int8) -> 1.19 (weights only) -> 1.13 with the Loop body's table
dequantized once outside the loop (NNCF, which keeps the bodies float: 1.15-1.19); the 192-640-MAC heads of
cnn_digits, gru_digits and transformer_text measured the same either way (within 1 %).
Lossy: parity is judged by ``metric_floors``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxslim.errors import UsageError
from onnxslim.graph import ModelContract, export_graph, peek_values
from onnxslim.pass_base import Pass, PassContext, PassResult, iter_graphs

from ._quantize_bias_correction import bias_correction_means, correct_biases
from ._quantize_gptq import WeightQuantizer, gptq_requests
from ._quantize_hardware import REDUCED_WEIGHT_QMAX, resolve_hardware
from ._quantize_math import WEIGHT_QMAX, activation_qparams, quantize_bias
from ._quantize_ladder import apply_precision_ladder
from ._quantize_plan import NodePlan, QuantizePlanner

__all__ = ["QuantizeInt8Static"]

log = logging.getLogger(__name__)

WEIGHTED_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
WEIGHT_ONLY_OPS = ("LSTM", "GRU", "RNN", "Gather")
PASS_THROUGH_OPS = ("Add", "Mul", "Concat", "MaxPool", "AveragePool", "GlobalAveragePool", "Resize")
DEFAULT_OP_TYPES = WEIGHTED_OPS + WEIGHT_ONLY_OPS + PASS_THROUGH_OPS


class QuantizeInt8Static(Pass):
    """Static int8 quantization (QDQ): int8 weights, calibrated uint8/int8 activations."""

    name = "quantize_int8_static"
    exact = False
    needs_calibration = True
    idempotent = False  # a second run finds nothing left to quantize
    metric_floors = {"cosine": 0.99, "accuracy_drop": 0.01}

    @dataclass
    class Options:
        activations: Literal["auto", "uint8", "int8"] = field(
            default="auto", metadata={"help": "activation type: uint8 (affine; fastest on x86) or int8 (s8s8; ARM); "
                                              "auto = from target"})
        weights_per_channel: bool = field(
            default=True, metadata={"help": "one weight scale per output channel (opset >= 13; else per tensor)"})
        range_method: Literal["auto", "minmax", "percentile", "entropy", "mse"] = field(
            default="auto", metadata={"help": "activation range from calibration; auto = minmax (weights are "
                                              "always minmax)"})
        percentile: float = field(default=99.999, metadata={"help": "percentile for range_method=percentile"})
        exclude_nodes: list[str] = field(default_factory=list, metadata={"help": "node names to keep float"})
        exclude_op_types: list[str] = field(default_factory=list, metadata={"help": "op types to keep float"})
        op_types: list[str] = field(
            default_factory=lambda: list(DEFAULT_OP_TYPES),
            metadata={"help": "op types to quantize (Conv/ConvTranspose/MatMul/Gemm fully; LSTM/GRU/RNN/Gather "
                              "weights only; Add/Mul/Concat/pooling/Resize as pass-through between quantized nodes)"})
        keep_float_outputs: bool = field(
            default=True, metadata={"help": "never put Q/DQ on a graph output (the logits stay float); false "
                                            "quantizes outputs of quantized nodes so the last op fuses too"})
        min_macs_for_activation_quantization: int = field(
            default=1024, metadata={"help": "Conv/MatMul/Gemm layers with fewer multiply-accumulates per sample "
                                            "(weight elements x output positions) get int8 weights only, float "
                                            "activations: their Q/DQ costs more than the int8 kernel saves; "
                                            "0 = quantize every layer fully"})
        weight_only_encoding: Literal["cast_mul", "dequantize_linear"] = field(
            default="cast_mul", metadata={"help": "how int8 weights of weights-only layers (LSTM/GRU/RNN, Gather "
                                                  "tables, small or weight_only layers) are stored: cast_mul = "
                                                  "Cast + Mul by a per-channel scale (any opset; onnxruntime "
                                                  "folds it into a float weight at load, so the layer runs at "
                                                  "fp32 speed); dequantize_linear = DequantizeLinear (per "
                                                  "channel needs opset >= 13)"})
        weight_rounding: Literal["gptq", "nearest"] = field(
            default="gptq", metadata={"help": "int8 weight values: gptq = GPTQ, rounded column by column with the "
                                              "error pushed onto later columns to minimize the layer's output "
                                              "error on calibration data (MatMul/Gemm, LSTM/GRU/RNN); nearest = "
                                              "round to nearest"})
        gptq_damping: float = field(
            default=0.01, metadata={"help": "GPTQ: added to the diagonal of E[x x^T], relative to its mean"})
        gptq_max_gram_mb: int = field(
            default=1024, metadata={"help": "GPTQ: memory for the input Gram matrices (8 C^2 bytes per C-feature "
                                            "input) while calibrating; inputs past it are rounded to nearest"})
        allow_nothing: bool = field(
            default=False, metadata={"help": "accept a model with nothing to quantize (else it is an error)"})
        # --- hardware-aware defaults and bias correction (_quantize_hardware, _quantize_bias_correction)
        target: Literal["auto", "x86-vnni", "x86-avx2", "arm-dotprod", "arm", "generic"] = field(
            default="auto", metadata={"help": "CPU the model will run on: sets reduce_range (x86-avx2) and the "
                                              "activation type (uint8 on x86, int8 on ARM); auto = this machine"})
        reduce_range: bool | None = field(
            default=None, metadata={"help": "7-bit weights [-64, 63] (avoids int16 saturation of u8s8 on x86 "
                                            "without VNNI); unset = from target"})
        bias_correction: bool = field(
            default=True, metadata={"help": "shift each quantized Conv/Gemm/MatMul bias by -(W_q - W) E[x] "
                                             "(E[x] from calibration) to cancel the mean weight-rounding error"})

        # --- precision ladder per node and auto_precision search (_quantize_ladder)
        int16_activation_nodes: list[str] = field(
            default_factory=list, metadata={"help": "nodes given int8 weights + 16-bit activations (names, globs, "
                                                    "re:REGEX or op:OpType; needs opset >= 21 or a com.microsoft "
                                                    "import, else they get weights only)"})
        weight_only_nodes: list[str] = field(
            default_factory=list, metadata={"help": "nodes given int8 weights and float activations (names, globs, "
                                                    "re:REGEX or op:OpType)"})
        float_nodes: list[str] = field(
            default_factory=list, metadata={"help": "nodes kept float (names, globs, re:REGEX or op:OpType)"})
        auto_precision: bool = field(
            default=False, metadata={"help": "measure each layer's damage to the outputs on calibration data and "
                                             "move the worst up the ladder (int16 act -> weights only -> float) "
                                             "until precision_floor_cosine holds"})
        precision_floor_cosine: float = field(
            default=0.999, metadata={"help": "auto_precision: output cosine (float vs quantized) to reach"})
        max_sensitivity_layers: int = field(
            default=24, metadata={"help": "auto_precision: most layers probed one by one (the ones nearest the "
                                          "outputs when there are more)"})
        sensitivity_samples: int = field(
            default=16, metadata={"help": "auto_precision: calibration samples the outputs are compared on"})

        def validate(self) -> str | None:
            if not 50.0 < self.percentile <= 100.0:
                return f"percentile must be in (50, 100]; got {self.percentile}"
            if not self.gptq_damping > 0:
                return f"gptq_damping must be > 0; got {self.gptq_damping}"
            if self.gptq_max_gram_mb < 0:
                return f"gptq_max_gram_mb must be >= 0; got {self.gptq_max_gram_mb}"
            return None

    # ------------------------------------------------------------------------------------------ run
    def run(self, ctx: PassContext) -> PassResult:
        result = PassResult()
        opts = self.options
        if ctx.opset < 10:
            raise UsageError(f"{self.name}: QuantizeLinear needs opset >= 10 and this model uses opset {ctx.opset}; "
                             "convert it first (onnx.version_converter)")
        # The graph is in topological order here (the pipeline sorts it after every pass; a file's order is).
        model = _export_for_statistics(ctx)
        types, shapes = _inferred_types(model)
        per_channel = opts.weights_per_channel and ctx.opset >= 13
        if opts.weights_per_channel and not per_channel:
            result.notes.append(f"opset {ctx.opset} < 13: per-tensor weight scales (DequantizeLinear has no "
                                "axis attribute before opset 13)")
        planner = QuantizePlanner(opts, types, per_channel, result, shapes)
        plans = planner.plan(ctx.graph)
        if not plans:
            why = planner.nothing_reason()
            if opts.allow_nothing:
                result.notes.append(f"nothing to quantize: {why}")
                return result
            raise UsageError(f"{self.name}: nothing to quantize in this model: {why}; pass allow_nothing=true "
                             "to accept an unchanged model")
        names = {n for p in plans for n in p.activation_names()}
        if not opts.keep_float_outputs:
            names.update(o.name for p in plans if p.graph is ctx.graph and p.activations
                         for o in p.node.outputs if o in ctx.graph.outputs and planner.is_float(o))
        names = sorted(names)
        # --- hardware-aware defaults, one calibration run, weight rounding, bias correction
        hw = resolve_hardware(opts.target, opts.reduce_range, opts.activations)
        result.notes.append(hw.note())
        weight_qmax = REDUCED_WEIGHT_QMAX if hw.reduce_range else WEIGHT_QMAX
        weights = WeightQuantizer(weight_qmax, opts.gptq_damping)
        use_data = ctx.calibration is not None
        means = bias_correction_means(plans) if opts.bias_correction and use_data else {}
        gptq = gptq_requests(plans, planner) if opts.weight_rounding == "gptq" and use_data else []
        grams = self._gram_budget(gptq, shapes, result)
        stats = self._collect(ctx, model, names, means, grams)
        for node, i, axis, in_axis, x, _ in gptq:
            st = stats.get(x) if x in grams else None
            if st is not None and st.gram is not None and st.gram_rows:
                const = planner.constant_of(node.inputs[i])[0]
                weights.register(peek_values(const), axis, in_axis, st.gram / st.gram_rows)
        if means:
            correct_biases(ctx, stats, plans, planner, weights, result)
        qparams = self._activation_qparams(stats, names, result, signed=hw.activations == "int8")
        rewriter = _Rewriter(ctx, result, qparams, opts, types)
        rewriter.weight_qmax = weight_qmax
        rewriter.weights = weights
        apply_precision_ladder(ctx, model, plans, planner, opts, result, rewriter)  # rungs, then rewriter.apply
        if weights.gptq_weights:
            result.count("weights_gptq_rounded", weights.gptq_weights)
        result.modified = bool(result.stats.get("weights_quantized") or result.stats.get("activations_quantized"))
        if not result.modified and not opts.allow_nothing:
            raise UsageError(f"{self.name}: nothing could be quantized in this model (see the skips); pass "
                             "allow_nothing=true to accept an unchanged model")
        return result

    def _gram_budget(self, requests: list, shapes: dict[str, list], result: PassResult) -> dict[str, int]:
        """Activation -> feature axis for the Gram matrices GPTQ needs, within ``gptq_max_gram_mb`` in all (a
        C-feature input costs 8 C^2 bytes while calibrating); the rest is rounded to nearest, noted."""
        grams: dict[str, int] = {}
        budget = self.options.gptq_max_gram_mb * 2**20
        left_out = 0
        for node, i, axis, in_axis, x, x_axis in requests:
            if x in grams:
                if grams[x] != x_axis:
                    left_out += 1  # the same tensor read along another axis (Gemm transA): rare
                continue
            shape = shapes.get(x)
            c = shape[x_axis] if shape and -len(shape) <= x_axis < len(shape) else None
            if not isinstance(c, int) or c <= 0 or 8 * c * c > budget:
                left_out += 1
                continue
            budget -= 8 * c * c
            grams[x] = x_axis
        if left_out:
            result.notes.append(f"GPTQ: {left_out} weight(s) rounded to nearest (input feature count unknown or "
                                f"past gptq_max_gram_mb={self.options.gptq_max_gram_mb})")
        return grams

    def _collect(self, ctx: PassContext, model: onnx.ModelProto, names: list[str], means: dict[str, int],
                 grams: dict[str, int]):
        """Everything the pass needs from the calibration data (activation ranges, bias-correction means, GPTQ
        Gram matrices) in ONE run over it."""
        wanted = list(dict.fromkeys([*names, *means, *grams]))
        if not wanted:
            return {}
        if ctx.calibration is None:
            raise UsageError(f"{self.name} needs calibration data; give --calib DIR (or calibration=...)")
        from onnxslim.calibration import collect_statistics

        method = "minmax" if self.options.range_method == "auto" else self.options.range_method
        return collect_statistics(model, ctx.calibration, wanted, means=means, grams=grams,
                                  histograms=names if method != "minmax" else False, base_dir=ctx.base_dir)

    def _activation_qparams(self, stats, names: list[str], result: PassResult,
                            signed: bool | None = None) -> dict[str, tuple[np.float32, np.ndarray]]:
        if signed is None:
            signed = self.options.activations == "int8"
        method = "minmax" if self.options.range_method == "auto" else self.options.range_method
        out: dict[str, tuple[np.float32, np.ndarray]] = {}
        for name in names:
            st = stats.get(name) if hasattr(stats, "get") else None
            if st is None or not getattr(st, "count", 0):
                continue  # never computed on the calibration data (e.g. an If branch no sample took)
            try:
                lo, hi = st.range(method, percentile=self.options.percentile) if method == "percentile" \
                    else st.range(method)
                out[name] = activation_qparams(lo, hi, signed=signed)
            except (ValueError, TypeError) as e:
                result.notes.append(f"activation '{name}' not quantized: {e}")
        return out


# --------------------------------------------------------------------------------------------- helpers
def _export_for_statistics(ctx: PassContext) -> onnx.ModelProto:
    """The current graph as a model ORT can run, for calibration (the pipeline's own export path)."""
    graph = ctx.graph
    opsets = [onnx.helper.make_opsetid(d.domain, d.version) for d in graph.import_domains] if graph.import_domains \
        else [onnx.helper.make_opsetid("", ctx.opset)]
    ir = max(int(getattr(graph, "ir_version", 0) or 0), onnx.helper.find_min_ir_version_for(opsets, ignore_unknown=True))
    contract = ModelContract(inputs=[], outputs=[], ir_version=ir, opset_import=opsets, producer_name="onnxslim",
                             producer_version="", domain="", model_version=0, doc_string="",
                             graph_name=graph.name or "graph", graph_doc_string="", metadata_props=[])
    return export_graph(graph, contract)


def _inferred_types(model: onnx.ModelProto) -> tuple[dict[str, int], dict[str, list]]:
    """elem_type and shape (dims int or None) by tensor name (subgraphs included), from the model's
    annotations plus shape inference."""
    from onnxslim.graph import iter_graph_protos

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception as e:  # noqa: BLE001 - inference is a help, not a requirement
        log.debug("shape inference failed: %s", e)
        inferred = model
    types: dict[str, int] = {}
    shapes: dict[str, list] = {}
    for g in iter_graph_protos(inferred.graph):
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                types.setdefault(vi.name, vi.type.tensor_type.elem_type)
                if vi.type.tensor_type.HasField("shape"):
                    shapes.setdefault(vi.name, [d.dim_value if d.HasField("dim_value") else None
                                                for d in vi.type.tensor_type.shape.dim])
        for t in g.initializer:
            types.setdefault(t.name, t.data_type)
    return types, shapes


class _Rewriter:
    """Applies plans: Q/DQ pairs on activations, int8 weights + DQ, int32 biases."""

    weight_qmax: int = WEIGHT_QMAX  # 63 with reduce_range (set by the pass)
    weights: WeightQuantizer | None = None  # rounding shared with bias correction (set by the pass)

    def __init__(self, ctx: PassContext, result: PassResult, qparams, opts, types: dict[str, int]):
        self.ctx, self.result, self.qparams, self.opts, self.types = ctx, result, qparams, opts, types
        self.taken = {t for g in iter_graphs(ctx.graph) for t in g.tensors()} | \
            {n.name for g in iter_graphs(ctx.graph) for n in g.nodes}
        self.act_cache: dict[tuple[int, str], gs.Variable] = {}
        self.made: dict[int, str] = {}  # id of a DQ output this rewriter made -> the activation it stands for
        self.weight_cache: dict[tuple[int, int, int | None], tuple[gs.Variable, np.ndarray]] = {}
        self.int8_cache: dict[tuple[int, int | None, int | None], tuple[gs.Constant, gs.Constant, gs.Constant, list]] = {}
        self.replaced: dict[int, tuple[gs.Constant, gs.Node | None, gs.Graph | None]] = {}

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self.taken:
            name, i = f"{base}_{i}", i + 1
        self.taken.add(name)
        return name

    def apply(self, plans: list[NodePlan], planner: QuantizePlanner) -> None:
        for p in plans:
            x_scales: dict[int, np.float32] = {}
            for i in p.activations:
                t = p.node.inputs[i]
                if id(t) in self.made:  # already rewired by another plan of this node (pool output + Concat)
                    x_scales[i] = self.qparams[self.made[id(t)]][0]
                    continue
                if t.name not in self.qparams:
                    self.result.skip(p.node, f"input '{t.name}' has no calibration statistics (not reached by the "
                                             "calibration data); it stays float", p.graph)
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
                dq, w_scale = self.dequantized_weight(home, p.node, const, axis, local and home is p.graph,
                                                      cast_mul=cast_mul)
                self.replaced[id(const)] = (const, const_node, owner)
                p.node.inputs[i] = dq
            if p.bias is not None and w_scale is not None and 0 in x_scales:
                const, const_node, owner = planner.constant_of(p.node.inputs[p.bias])
                if self.quantize_bias(p, const, x_scales[0], w_scale):
                    self.replaced[id(const)] = (const, const_node, owner)
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
        graph.nodes.append(gs.Node("QuantizeLinear", self.fresh(f"{base}_QuantizeLinear"), inputs=[t, s, z], outputs=[q]))
        graph.nodes.append(gs.Node("DequantizeLinear", self.fresh(f"{base}_DequantizeLinear"), inputs=[q, s, z],
                                   outputs=[dq]))
        self.act_cache[key] = dq
        self.made[id(dq)] = t.name
        self.result.count("activations_quantized")
        return dq

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
                main.nodes.append(gs.Node("QuantizeLinear", self.fresh(f"{out.name}_QuantizeLinear"),
                                          inputs=[inner, s, z], outputs=[q]))
                main.nodes.append(gs.Node("DequantizeLinear", self.fresh(f"{out.name}_DequantizeLinear"),
                                          inputs=[q, s, z], outputs=[out]))
                self.result.count("outputs_quantized")

    # -------------------------------------------------------------------------------- weights
    def dequantized_weight(self, graph: gs.Graph, node: gs.Node, const: gs.Constant, axis: int | None,
                           local: bool = False, cast_mul: bool = False) -> tuple[gs.Variable, np.ndarray]:
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
            self.int8_cache[ckey] = (gs.Constant(self.fresh(f"{base}_int8"), q),
                                     gs.Constant(self.fresh(f"{base}_scale"), scale),
                                     # explicit zero points: onnxruntime's QGemm fusion needs them
                                     gs.Constant(self.fresh(f"{base}_zero_point"), np.zeros(scale.shape, np.int8)),
                                     list(w.shape))
            self.result.count("weights_quantized")
            self.result.count("weight_bytes_int8", q.nbytes + scale.nbytes + scale.size)
        qc, sc, zc, shape = self.int8_cache[ckey]
        dq = gs.Variable(self.fresh(f"{const.name}_dequantized"), dtype=np.float32, shape=shape)
        if cast_mul:
            self.cast_mul_weight(graph, const.name, qc, sc, axis, dq)
            self.weight_cache[key] = (dq, sc.values)
            return dq, sc.values
        attrs = {"axis": int(axis)} if axis is not None else {}
        graph.nodes.append(gs.Node("DequantizeLinear", self.fresh(f"{const.name}_DequantizeLinear"), attrs=attrs,
                                   inputs=[qc, sc, zc], outputs=[dq]))
        self.weight_cache[key] = (dq, sc.values)
        return dq, sc.values

    def cast_mul_weight(self, graph: gs.Graph, base: str, qc: gs.Constant, sc: gs.Constant, axis: int | None,
                        out: gs.Variable) -> None:
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
        graph.nodes.append(gs.Node("Cast", self.fresh(f"{base}_Cast"), attrs={"to": onnx.TensorProto.FLOAT},
                                   inputs=[qc], outputs=[cast]))
        graph.nodes.append(gs.Node("Mul", self.fresh(f"{base}_Mul"), inputs=[cast, s], outputs=[out]))

    def quantize_bias(self, p: NodePlan, b_t: gs.Constant, x_scale: np.float32, w_scale: np.ndarray) -> bool:
        b = peek_values(b_t).astype(np.float32)
        if b.ndim != 1 or (w_scale.ndim == 1 and b.shape[0] != w_scale.shape[0]):
            self.result.skip(p.node, f"bias '{b_t.name}' shape {list(b.shape)} does not match the weight "
                                     "channels; it stays float", p.graph)
            return False
        got = quantize_bias(b, x_scale, w_scale)
        if got is None:
            self.result.skip(p.node, f"bias '{b_t.name}' would overflow int32; it stays float", p.graph)
            return False
        q, scale = got
        base = b_t.name
        qc = gs.Constant(self.fresh(f"{base}_int32"), q)
        sc = gs.Constant(self.fresh(f"{base}_scale"), scale)
        zc = gs.Constant(self.fresh(f"{base}_zero_point"), np.zeros(scale.shape, dtype=np.int32))
        dq = gs.Variable(self.fresh(f"{base}_dequantized"), dtype=np.float32, shape=list(b.shape))
        attrs = {"axis": 0} if scale.ndim == 1 else {}
        p.graph.nodes.append(gs.Node("DequantizeLinear", self.fresh(f"{base}_DequantizeLinear"), attrs=attrs,
                                     inputs=[qc, sc, zc], outputs=[dq]))
        p.node.inputs[p.bias] = dq
        self.result.count("biases_quantized")
        self.result.count("weight_bytes_int8", q.nbytes + scale.nbytes + q.nbytes)  # int32 + scale + zero point
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
