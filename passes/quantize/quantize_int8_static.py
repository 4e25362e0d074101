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
Activation ranges: ``range_method=auto`` is mse (the clip range minimizing the expected squared quantization
error over the calibration histogram). On the sample models minmax, percentile (99.999) and mse gave the same
accuracy and logits cosine within 1e-5 of each other, entropy was worse (cosine 0.954 on cnn_digits); on the real
pretrained models (bench/real_models, held-out eval_more, 8-bit weights) mse agreed with fp32 more than minmax
on every model: NudeNet YOLOv8n F1 0.824 -> 0.892, DBNet mask IoU 0.945 -> 0.951, the orientation classifier
0.995 -> 1.000, SVTR lines 0.450 -> 0.534, Magika 0.990 -> 1.000, silero-vad 1.000 both (percentile 0.848 and
entropy 0.638 on YOLOv8n), so mse is the default.
Hardware (``target``, see ``_hardware``): x86 without VNNI gets 7-bit weights (reduce_range; u8s8
AVX2 kernels saturate int16 pair sums otherwise), ARM gets int8 (s8s8) activations; ``auto`` = this machine.
Bias correction (``_bias_correction``): each quantized Conv/Gemm/MatMul(+Add) bias is shifted by
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
Conv outputs: onnxruntime has no integer convolution with a float output, so DQ -> Conv becomes QLinearConv only
when a QuantizeLinear follows; a Conv whose output goes to float ops (SiLU/Sigmoid/HardSwish heads) would otherwise
run as "dequantize the weight, then a float Conv", slower than fp32. ``quantize_layer_outputs`` (default on) puts
one Q/DQ pair on such an output for all its readers (Relu/Clip/Reshape readers excepted when a quantized node reads
them next: the Q after them serves; a Squeeze before a float Add, as in Magika, is no such reader).
Measured on real models (bench/real_models, AVX2 without VNNI, int8/fp32 latency @1t -> with it): NudeNet
YOLOv8n 1.48 -> 1.16 (@2t 1.38 -> 0.94; QLinearConv 6 -> 63 of 64 convs), RapidOCR DBNet 1.33 -> 1.05, its
orientation classifier 2.09 -> 1.63, its recognizer 1.17 -> 0.95; decision agreement moved 0.947 -> 0.947,
0.83 -> 0.81, 0.92 -> 0.94 and 0.23 -> 0.11 (the recognizer's int8 is poor either way: opset 12, per-tensor weights).
Sigmoid is a pass-through op, and Add/Mul outputs get Q/DQ for readers that are not quantized themselves (Split,
Concat), so SiLU (x * sigmoid(x)) runs as QLinearSigmoid + QLinearMul: on NudeNet's YOLOv8n 57 of 58 Sigmoid and
57 of 61 Mul fused (45 without the output rule), at the same decision agreement (0.947).
A Gemm bias written [1, N] (jax2tf, tf2onnx) is stored 1-D int32 like any other: with a float bias onnxruntime
left the Gemm float on dequantized weights (Magika: QGemm and QLinearConv with these two rules, int8/fp32 latency
about 1.4x -> 0.35-0.9x, measured under load). Depthwise Convs get int8 weights only on x86 targets
(``depthwise_conv=auto``): onnxruntime's int8 depthwise kernels, with the Q/DQ and NHWC transposes around them,
ran slower than its float NCHWc ones (RapidOCR's MobileNetV3 classifier 1.50x -> 1.05x fp32, same agreement).
Weights-only layers (LSTM/GRU/RNN, Gather tables, the small layers above, ``weight_only`` rungs) store their int8
weights as ``Mul(Cast(int8), scale)`` (``weight_only_encoding=cast_mul``): the scale broadcasts per channel at
any opset, and onnxruntime folds the two nodes into a float initializer when the session loads, so such a layer
runs as fast as in fp32 (measured @1t: gru_digits 1.046 -> 0.989, wine_ifloop 1.159 -> 1.002; with
DequantizeLinear, onnxruntime rewrites DQ -> MatMul/Gemm into MatMulNBits, which also re-quantizes the input).
Weight values: GPTQ rounding from calibration Gram matrices (``_gptq``; MatMul/Gemm, Conv, LSTM/GRU/RNN), on
by default; gru_digits 0.9733 -> 0.9756 accuracy (= fp32), mean |logit error| 0.0121 -> 0.0098.
Calibration: activation ranges, bias-correction means and GPTQ Gram matrices come from one run over the data.
Lossy: parity is judged by ``metric_floors``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx

from onnxslim.calibration_ranges import RANGE_METHODS
from onnxslim.calibration_service import StatisticsRequest
from onnxslim.calibration_stats import ConvPatches
from onnxslim.errors import UsageError
from onnxslim.graph_edit import peek_values
from onnxslim.gs_bridge import export_standalone
from onnxslim.pass_base import Pass, PassContext, PassResult
from onnxslim.sensitivity import check_criterion

from ._bias_correction import bias_correction_means, correct_biases
from ._codebook_int8 import codebook_gram_requests
from ._gptq import WeightQuantizer, gptq_requests
from ._hardware import REDUCED_WEIGHT_QMAX, resolve_hardware
from ._ladder import apply_precision_ladder
from ._math import WEIGHT_QMAX, activation_qparams
from ._ops import DEFAULT_OP_TYPES
from ._plan import QuantizePlanner
from ._rewrite import Rewriter

__all__ = ["QuantizeInt8Static"]

# "auto" and every method of calibration_ranges.RANGE_METHODS (a new method there is a new choice here).
RangeMethodName = Literal[("auto", *RANGE_METHODS)]

log = logging.getLogger(__name__)


class QuantizeInt8Static(Pass):
    """Static int8 quantization (QDQ): int8 weights, calibrated uint8/int8 activations."""

    name = "quantize_int8_static"
    exact = False
    needs_calibration = True
    runs_before = ("distill_layers",)  # distillation refits the biases int8 leaves float
    idempotent = False  # a second run finds nothing left to quantize
    metric_floors = {"cosine": 0.99, "accuracy_drop": 0.01}

    @dataclass
    class Options:
        activations: Literal["auto", "uint8", "int8"] = field(
            default="auto",
            metadata={
                "help": "activation type: uint8 (affine; fastest on x86) or int8 (s8s8; ARM); auto = from target"
            },
        )
        weights_per_channel: bool = field(
            default=True, metadata={"help": "one weight scale per output channel (opset >= 13; else per tensor)"}
        )
        range_method: RangeMethodName = field(
            default="auto",
            metadata={"help": "activation range from calibration; auto = mse (weights are always minmax)"},
        )
        percentile: float = field(default=99.999, metadata={"help": "percentile for range_method=percentile"})
        exclude_nodes: list[str] = field(default_factory=list, metadata={"help": "node names to keep float"})
        exclude_op_types: list[str] = field(default_factory=list, metadata={"help": "op types to keep float"})
        op_types: list[str] = field(
            default_factory=lambda: list(DEFAULT_OP_TYPES),
            metadata={
                "help": "op types to quantize (Conv/ConvTranspose/MatMul/Gemm fully; LSTM/GRU/RNN/Gather "
                "weights only; Add/Mul/Concat/pooling/Resize as pass-through between quantized nodes)"
            },
        )
        quantize_layer_outputs: bool = field(
            default=True,
            metadata={
                "help": "Q/DQ on the output of every Conv/ConvTranspose/MatMul/Gemm with quantized activations, for "
                "all its readers: onnxruntime fuses a layer into QLinearConv/QLinearMatMul/QGemm only when its "
                "output is quantized too; otherwise it dequantizes the weight and runs the float kernel, which is "
                "slower than fp32 (graph outputs stay float unless keep_float_outputs=false)"
            },
        )
        keep_float_outputs: bool = field(
            default=True,
            metadata={
                "help": "never put Q/DQ on a graph output (the logits stay float); false "
                "quantizes outputs of quantized nodes so the last op fuses too"
            },
        )
        min_macs_for_activation_quantization: int = field(
            default=1024,
            metadata={
                "help": "Conv/MatMul/Gemm layers with fewer multiply-accumulates per sample "
                "(weight elements x output positions) get int8 weights only, float "
                "activations: their Q/DQ costs more than the int8 kernel saves; "
                "0 = quantize every layer fully"
            },
        )
        depthwise_conv: Literal["auto", "int8", "weight_only"] = field(
            default="auto",
            metadata={
                "help": "depthwise Conv (group = input channels): int8 = full int8; weight_only = int8 weights, "
                "float activations (onnxruntime folds them to float at load: fp32 speed, the file still ~4x "
                "smaller); auto = weight_only on x86 targets, where onnxruntime's int8 depthwise kernels with "
                "their Q/DQ and layout changes ran slower than float (MobileNetV3 classifier 1.50x -> 1.05x "
                "fp32 latency), int8 elsewhere"
            },
        )
        weight_only_encoding: Literal["cast_mul", "dequantize_linear"] = field(
            default="cast_mul",
            metadata={
                "help": "how int8 weights of weights-only layers (LSTM/GRU/RNN, Gather "
                "tables, small or weight_only layers) are stored: cast_mul = "
                "Cast + Mul by a per-channel scale (any opset; onnxruntime "
                "folds it into a float weight at load, so the layer runs at "
                "fp32 speed); dequantize_linear = DequantizeLinear (per "
                "channel needs opset >= 13)"
            },
        )
        weight_rounding: Literal["gptq", "nearest"] = field(
            default="gptq",
            metadata={
                "help": "int8 weight values: gptq = GPTQ, rounded column by column with the "
                "error pushed onto later columns to minimize the layer's output "
                "error on calibration data (MatMul/Gemm, group-1 Conv, "
                "LSTM/GRU/RNN); nearest = round to nearest"
            },
        )
        gptq_damping: float = field(
            default=0.01, metadata={"help": "GPTQ: added to the diagonal of E[x x^T], relative to its mean"}
        )
        gptq_max_gram_mb: int = field(
            default=1024,
            metadata={
                "help": "GPTQ: memory for the input Gram matrices (8 C^2 bytes per C-feature "
                "input) while calibrating; inputs past it are rounded to nearest"
            },
        )
        allow_nothing: bool = field(
            default=False, metadata={"help": "accept a model with nothing to quantize (else it is an error)"}
        )
        # --- hardware-aware defaults and bias correction (_quantize_hardware, _quantize_bias_correction)
        target: Literal["auto", "x86-vnni", "x86-avx2", "arm-dotprod", "arm", "generic"] = field(
            default="auto",
            metadata={
                "help": "CPU the model will run on: sets reduce_range (x86-avx2) and the "
                "activation type (uint8 on x86, int8 on ARM); auto = this machine"
            },
        )
        reduce_range: bool | None = field(
            default=None,
            metadata={
                "help": "7-bit weights [-64, 63] (avoids int16 saturation of u8s8 on x86 "
                "without VNNI); unset = from target"
            },
        )
        bias_correction: bool = field(
            default=True,
            metadata={
                "help": "shift each quantized Conv/Gemm/MatMul bias by -(W_q - W) E[x] "
                "(E[x] from calibration) to cancel the mean weight-rounding error"
            },
        )

        bias_correction_after_gptq: bool = field(
            default=True,
            metadata={
                "help": "bias correction also for the layers GPTQ rounds (false: only for the layers rounded to "
                "nearest; measured on the real pretrained models, mixed: YOLOv8n F1 0.892 -> 0.921, SVTR lines "
                "0.619 -> 0.587)"
            },
        )

        # --- precision ladder per node and auto_precision search (_quantize_ladder)
        int16_activation_nodes: list[str] = field(
            default_factory=list,
            metadata={
                "help": "nodes given int8 weights + 16-bit activations (names, globs, "
                "re:REGEX or op:OpType; needs opset >= 21 or a com.microsoft "
                "import, else they get weights only)"
            },
        )
        weight_only_nodes: list[str] = field(
            default_factory=list,
            metadata={"help": "nodes given int8 weights and float activations (names, globs, re:REGEX or op:OpType)"},
        )
        float_nodes: list[str] = field(
            default_factory=list, metadata={"help": "nodes kept float (names, globs, re:REGEX or op:OpType)"}
        )
        auto_precision: bool = field(
            default=False,
            metadata={
                "help": "measure each layer's damage to the outputs on calibration data and "
                "move the worst up the ladder (int16 act -> weights only -> float) "
                "until precision_floor_cosine holds"
            },
        )
        precision_floor_cosine: float = field(
            default=0.999,
            metadata={
                "help": "auto_precision: the score to reach (the output cosine, float vs quantized, with "
                "precision_metric=cosine; the decision score otherwise)"
            },
        )
        precision_metric: str = field(
            default="cosine",
            metadata={
                "help": "auto_precision: how damage is measured: cosine (worst output cosine), decisions "
                "(also each output's worst channel and the top-1 agreement of class scores: a ruined "
                "slice that a whole-tensor cosine hides counts), or script.py:function(reference, candidate)"
                " -> agreement in [0, 1] over per-sample dicts of outputs"
            },
        )
        max_sensitivity_layers: int = field(
            default=24,
            metadata={
                "help": "auto_precision: most layers probed one by one (the ones nearest the "
                "outputs when there are more)"
            },
        )
        sensitivity_time_budget_s: float = field(
            default=0.0,
            metadata={
                "help": "auto_precision: stop probing and moving layers after this many seconds and keep the "
                "best rungs found (0 = no limit; a limit makes the result depend on the machine's speed)"
            },
        )
        sensitivity_probe: Literal["revert", "alone"] = field(
            default="revert",
            metadata={
                "help": "auto_precision: how layers are ranked: revert = the score won by putting each back to "
                "float in the quantized model; alone = the score lost by quantizing it alone in the float model"
            },
        )
        sensitivity_samples: int = field(
            default=16, metadata={"help": "auto_precision: calibration samples the outputs are compared on"}
        )

        def validate(self) -> str | None:
            problem = check_criterion(self.precision_metric, "precision_metric")
            if problem:
                return problem
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
            raise UsageError(
                f"{self.name}: QuantizeLinear needs opset >= 10 and this model uses opset {ctx.opset}; "
                "convert it first (onnx.version_converter)"
            )
        # The graph is in topological order here (the pipeline sorts it after every pass; a file's order is).
        model = export_standalone(ctx.graph, ctx.opset)  # the graph as it is now, for calibration
        types, shapes = _inferred_types(model)
        per_channel = opts.weights_per_channel and ctx.opset >= 13
        if opts.weights_per_channel and not per_channel:
            result.notes.append(
                f"opset {ctx.opset} < 13: per-tensor weight scales (DequantizeLinear has no "
                "axis attribute before opset 13)"
            )
        hw = resolve_hardware(opts.target, opts.reduce_range, opts.activations)
        result.notes.append(hw.note())
        planner = QuantizePlanner(opts, types, per_channel, result, shapes, depthwise_int8=self._depthwise_int8(hw))
        plans = planner.plan(ctx.graph)
        if not plans:
            why = planner.nothing_reason()
            if opts.allow_nothing:
                result.notes.append(f"nothing to quantize: {why}")
                return result
            raise UsageError(
                f"{self.name}: nothing to quantize in this model: {why}; pass allow_nothing=true "
                "to accept an unchanged model"
            )
        names = {n for p in plans for n in p.activation_names()}
        if opts.quantize_layer_outputs:
            names.update(name for p in plans for name in planner.layer_output_names(p))
        if not opts.keep_float_outputs:
            names.update(
                o.name
                for p in plans
                if p.graph is ctx.graph and p.activations
                for o in p.node.outputs
                if o in ctx.graph.outputs and planner.is_float(o)
            )
        names = sorted(names)
        # --- hardware-aware defaults, one calibration run, weight rounding, bias correction
        weight_qmax = REDUCED_WEIGHT_QMAX if hw.reduce_range else WEIGHT_QMAX
        weights = WeightQuantizer(weight_qmax, opts.gptq_damping)
        use_data = ctx.calibration is not None
        means = bias_correction_means(plans) if opts.bias_correction and use_data else {}
        gptq = gptq_requests(plans, planner) if opts.weight_rounding == "gptq" and use_data else []
        books = codebook_gram_requests(plans, planner) if opts.weight_rounding == "gptq" and use_data else []
        grams = self._gram_budget(gptq + books, shapes, result)
        stats = self._collect(ctx, model, names, means, grams)
        for node, i, axis, in_axes, x, _ in gptq:
            st = stats.get(x) if x in grams else None
            if st is not None and st.gram is not None and st.gram_rows:
                const = planner.constant_of(node.inputs[i])[0]
                weights.register(peek_values(const), axis, in_axes, st.gram / st.gram_rows)
        if means:
            correct_biases(ctx, stats, plans, planner, weights, result, after_gptq=opts.bias_correction_after_gptq)
        qparams = self._activation_qparams(stats, names, result, signed=hw.activations == "int8")
        rewriter = Rewriter(ctx, result, qparams, opts, types)
        rewriter.weight_qmax = weight_qmax
        rewriter.weights = weights
        rewriter.codebook_grams = {
            x: st.gram / st.gram_rows
            for x, _ in books
            if x in grams and (st := stats.get(x)) is not None and st.gram is not None and st.gram_rows
        }
        rewriter.codebook_means = {
            x: st.channel_mean
            for p in plans
            if p.codebook is not None and (x := p.node.inputs[0].name) in means
            and (st := stats.get(x)) is not None and st.channel_mean is not None
        }  # fmt: skip
        apply_precision_ladder(ctx, model, plans, planner, opts, result, rewriter)  # rungs, then rewriter.apply
        if weights.gptq_weights:
            result.count("weights_gptq_rounded", weights.gptq_weights)
        result.modified = bool(result.stats.get("weights_quantized") or result.stats.get("activations_quantized"))
        if not result.modified and not opts.allow_nothing:
            raise UsageError(
                f"{self.name}: nothing could be quantized in this model (see the skips); pass "
                "allow_nothing=true to accept an unchanged model"
            )
        return result

    def _gram_budget(self, requests: list, shapes: dict[str, list], result: PassResult) -> dict[str, int]:
        """Activation -> feature axis for the Gram matrices GPTQ needs, within ``gptq_max_gram_mb`` in all (a
        C-feature input costs 8 C^2 bytes while calibrating); the rest is rounded to nearest, noted."""
        grams: dict[str, int] = {}
        budget = self.options.gptq_max_gram_mb * 2**20
        left_out = 0
        for *_, x, x_axis in requests:
            if x in grams:
                if grams[x] != x_axis:
                    left_out += 1  # the same tensor read along another axis (Gemm transA): rare
                continue
            shape = shapes.get(x)
            if isinstance(x_axis, ConvPatches):
                c = (
                    shape[1] * int(np.prod(x_axis.kernel))
                    if shape and len(shape) > 1 and isinstance(shape[1], int)
                    else None
                )
            else:
                c = shape[x_axis] if shape and -len(shape) <= x_axis < len(shape) else None
            if not isinstance(c, int) or c <= 0 or 8 * c * c > budget:
                left_out += 1
                continue
            budget -= 8 * c * c
            grams[x] = x_axis
        if left_out:
            result.notes.append(
                f"GPTQ: {left_out} weight(s) rounded to nearest (input feature count unknown or "
                f"past gptq_max_gram_mb={self.options.gptq_max_gram_mb})"
            )
        return grams

    def _collect(
        self, ctx: PassContext, model: onnx.ModelProto, names: list[str], means: dict[str, int], grams: dict[str, int]
    ):
        """Everything the pass needs from the calibration data (activation ranges, bias-correction means, GPTQ
        Gram matrices) as ONE request: one run over the data."""
        if not (names or means or grams):
            return {}
        if ctx.calibration is None:
            raise UsageError(f"{self.name} needs calibration data; give --calib DIR (or calibration=...)")
        method = self._range_method()
        return ctx.statistics(
            StatisticsRequest(
                tensors=tuple(names),
                means=means,
                grams=grams,
                histograms=frozenset(names) if RANGE_METHODS[method].needs_histogram else frozenset(),
            ),
            model=model,
        )

    def _depthwise_int8(self, hw) -> bool:
        if self.options.depthwise_conv != "auto":
            return self.options.depthwise_conv == "int8"
        return not hw.target.startswith("x86")

    def _range_method(self) -> str:
        return "mse" if self.options.range_method == "auto" else self.options.range_method

    def _activation_qparams(
        self, stats, names: list[str], result: PassResult, signed: bool | None = None
    ) -> dict[str, tuple[np.float32, np.ndarray]]:
        if signed is None:
            signed = self.options.activations == "int8"
        method = self._range_method()
        out: dict[str, tuple[np.float32, np.ndarray]] = {}
        for name in names:
            st = stats.get(name) if hasattr(stats, "get") else None
            if st is None or not getattr(st, "count", 0):
                continue  # never computed on the calibration data (e.g. an If branch no sample took)
            try:
                lo, hi = st.range(method, percentile=self.options.percentile)
                out[name] = activation_qparams(lo, hi, signed=signed)
            except (ValueError, TypeError) as e:
                result.notes.append(f"activation '{name}' not quantized: {e}")
        return out


# --------------------------------------------------------------------------------------------- helpers
def _inferred_types(model: onnx.ModelProto) -> tuple[dict[str, int], dict[str, list]]:
    """elem_type and shape (dims int or None) by tensor name (subgraphs included), from the model's
    annotations plus shape inference."""
    from onnxslim.graph import iter_graphs

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception as e:  # noqa: BLE001 - inference is a help, not a requirement
        log.debug("shape inference failed: %s", e)
        inferred = model
    types: dict[str, int] = {}
    shapes: dict[str, list] = {}
    for g in iter_graphs(inferred.graph):
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                types.setdefault(vi.name, vi.type.tensor_type.elem_type)
                if vi.type.tensor_type.HasField("shape"):
                    shapes.setdefault(
                        vi.name,
                        [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim],
                    )
        for t in g.initializer:
            types.setdefault(t.name, t.data_type)
    return types, shapes
