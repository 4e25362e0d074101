"""Private helper of quantize_int8_static: a precision ladder per node, and the auto_precision search.

Rungs, lowest precision first: ``int8`` (int8 weights, 8-bit activations) -> ``int16`` (int8 weights, 16-bit
activations) -> ``weight_only`` (int8 weights, float activations; the file is still ~4x smaller) -> ``float``.
A node gets the highest rung any override names it in (``float_nodes`` > ``weight_only_nodes`` >
``int16_activation_nodes``; entries are node names, globs ``*?[]``, ``re:REGEX`` or ``op:OpType``).

16-bit activations are Q/DQ pairs with int16/uint16 zero points. ONNX allows them in the default domain
from opset 21; onnxruntime also runs the ``com.microsoft`` QuantizeLinear/DequantizeLinear with 16-bit types
at any opset, but that domain must already be imported by the model (adding an opset import would break the
model's contract). Where neither holds, an int16 request becomes ``weight_only`` (one rung higher), noted.
The 16-bit range is the 8-bit pair's range widened by half an 8-bit step on each side (covers the calibrated
range whatever the 8-bit rounding of the zero point), over 65535 steps.

auto_precision: every candidate layer (a planned node) is put back to float alone in the model quantized at the
requested rungs (``sensitivity_probe=revert``, the default; ``alone``: quantized alone in the float model) on a
copy of the graph, and the float model's outputs are compared with the candidate's on up to
``sensitivity_samples`` calibration feeds by the core's sensitivity engine (``onnxslim.sensitivity``: cosine over
all samples, worst output). Layers are ranked by the score that revert wins (alone: by the score it loses); a
layer quantized alone among float neighbours can look harmless while among quantized ones it is not (NudeNet's
YOLOv8n: three layers int8 alone agreed less than all 57 int8), so the revert probe ranks by what the search then
really changes; starting from the requested rungs, the worst layer moves up one rung at a time (each move re-measured on
the whole model) until the output cosine reaches ``precision_floor_cosine``. Cost: two ORT sessions per probe (at
most ``max_sensitivity_layers`` probes; beyond it, the layers nearest the outputs are probed) plus two per rung
tried.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxslim.errors import UsageError
from onnxslim.graph_edit import Names, constant_source, node_matches
from onnxslim.gs_bridge import export_standalone
from onnxslim.pass_base import PassContext, PassResult, iter_graphs
from onnxslim.sensitivity import SensitivityEngine, resolve_criterion

from ._ops import FOLLOWING_ADD, OPS
from ._plan import _ELEMENTWISE_PASS_THROUGH, _SINGLE_INPUT_PASS_THROUGH, NodePlan, QuantizePlanner

__all__ = ["RUNGS", "apply_precision_ladder"]

log = logging.getLogger(__name__)

RUNGS = ("int8", "int16", "weight_only", "float")
_PASS_THROUGH = _ELEMENTWISE_PASS_THROUGH | _SINGLE_INPUT_PASS_THROUGH
Key = tuple[int, int]  # (graph index in iter_graphs order, node index): stable across Graph.copy()


# ------------------------------------------------------------------------------------------ overrides
def _keys(root: gs.Graph) -> tuple[dict[int, Key], dict[Key, tuple[gs.Graph, gs.Node]]]:
    by_id, by_key = {}, {}
    for gi, g in enumerate(iter_graphs(root)):
        for ni, n in enumerate(g.nodes):
            by_id[id(n)] = (gi, ni)
            by_key[(gi, ni)] = (g, n)
    return by_id, by_key


def _requested_rungs(opts, plans: list[NodePlan], keys: dict[int, Key], result: PassResult) -> dict[Key, str]:
    rungs: dict[Key, str] = {}
    for rung, patterns, option in (
        ("int16", opts.int16_activation_nodes, "int16_activation_nodes"),
        ("weight_only", opts.weight_only_nodes, "weight_only_nodes"),
        ("float", opts.float_nodes, "float_nodes"),
    ):
        for pat in patterns:
            hit = [p for p in plans if node_matches(pat, p.node)]
            if not hit:
                result.notes.append(f"{option}: '{pat}' matches no node this pass quantizes")
            for p in hit:
                k = keys[id(p.node)]
                if RUNGS.index(rung) > RUNGS.index(rungs.get(k, "int8")):
                    rungs[k] = rung  # the highest precision asked for wins
    return rungs


# ------------------------------------------------------------------------------------------ plans
def _floor_rung(p: NodePlan) -> str:
    """The lowest rung a plan can take: a weights-only plan (Gather, LSTM) starts at weight_only."""
    return "int8" if p.activations else "weight_only"


def _adjust(
    plans: list[NodePlan], rungs: dict[Key, str], keys: dict[int, Key], planner: QuantizePlanner, root: gs.Graph
) -> list[NodePlan]:
    """Plans with the rungs applied; pass-through plans are re-planned around what stays quantized."""
    out = []
    for p in plans:
        if (p.pass_through or p.node.op in _PASS_THROUGH) and not p.weights:
            continue
        rung = rungs.get(keys[id(p.node)], "int8")
        if rung == "float":
            continue
        if rung == "weight_only":
            p.activations, p.bias = [], None  # the int32 bias needs the input scale; it stays float
            if not p.weights:
                continue
        out.append(p)
    for p in planner.plan_pass_through(root, out):
        if rungs.get(keys[id(p.node)], "int8") in ("int8", "int16"):  # no weights: weight_only is float
            out.append(p)
    return out


def _normalize(rungs: dict[Key, str], plans: list[NodePlan], keys: dict[int, Key]) -> dict[Key, str]:
    """Rungs as they act: a weights-only plan (Gather, LSTM) is already at weight_only (int16 asks nothing
    more); a plan without weights (pass-through, activation x activation MatMul) has no weight_only: float."""
    out = dict(rungs)
    for p in plans:
        k = keys[id(p.node)]
        if k not in out:
            continue
        if not p.activations and out[k] in ("int16", "weight_only"):
            del out[k]
        elif not p.weights and out[k] == "weight_only":
            out[k] = "float"
    return out


def _int16_domain(ctx: PassContext) -> str | None:
    if ctx.opset >= 21:
        return ""
    if any(d.domain == "com.microsoft" for d in (ctx.graph.import_domains or [])):
        return "com.microsoft"
    return None


def _widen(root: gs.Graph, rungs: dict[Key, str], domain: str, result: PassResult | None, names: Names) -> int:
    """Replace the 8-bit activation Q/DQ in front of int16-rung nodes with 16-bit pairs; returns nodes widened."""
    by_id, by_key = _keys(root)
    fresh = names.fresh

    cache: dict[tuple[int, str], gs.Variable] = {}
    widened = 0
    for key, rung in sorted(rungs.items()):
        if rung != "int16" or key not in by_key:
            continue
        g, node = by_key[key]
        done = False
        for i, t in enumerate(list(node.inputs)):
            dq = t.inputs[0] if len(t.inputs) == 1 else None
            q = (
                dq.inputs[0].inputs[0]
                if dq is not None and dq.op == "DequantizeLinear" and len(dq.inputs[0].inputs) == 1
                else None
            )
            if q is None or q.op != "QuantizeLinear" or isinstance(q.inputs[0], gs.Constant):
                continue  # not an activation pair (int8 weights stay int8 on every rung)
            x = q.inputs[0]
            ck = (id(g), x.name)
            if ck not in cache:
                s8 = float(np.asarray(q.inputs[1].values))
                zp8 = np.asarray(q.inputs[2].values)
                info8 = np.iinfo(zp8.dtype)
                lo = (info8.min - int(zp8)) * s8 - s8 / 2
                hi = (info8.max - int(zp8)) * s8 + s8 / 2
                scale, zp = _qparams16(lo, hi, signed=zp8.dtype == np.int8)
                sc = gs.Constant(fresh(f"{x.name}_scale16"), np.array(scale, dtype=np.float32))
                zc = gs.Constant(fresh(f"{x.name}_zero_point16"), zp)
                q16 = gs.Variable(fresh(f"{x.name}_quantized16"), dtype=zp.dtype, shape=x.shape)
                dq16 = gs.Variable(fresh(f"{x.name}_dequantized16"), dtype=np.float32, shape=x.shape)
                g.nodes.append(
                    gs.Node(
                        "QuantizeLinear",
                        fresh(f"{x.name}_QuantizeLinear16"),
                        domain=domain or None,
                        inputs=[x, sc, zc],
                        outputs=[q16],
                    )
                )
                g.nodes.append(
                    gs.Node(
                        "DequantizeLinear",
                        fresh(f"{x.name}_DequantizeLinear16"),
                        domain=domain or None,
                        inputs=[q16, sc, zc],
                        outputs=[dq16],
                    )
                )
                cache[ck] = dq16
                if result is not None:
                    result.count("activations_int16")
            node.inputs[i] = cache[ck]
            done = True
            _drop_unused_pair(g, dq, q, result)
        widened += done
    return widened


def _drop_unused_pair(g: gs.Graph, dq: gs.Node, q: gs.Node, result: PassResult | None) -> None:
    out = dq.outputs[0]
    if out.outputs or any(o is out for o in g.outputs):
        return  # other (int8) consumers still read the 8-bit pair
    g.nodes.remove(dq)
    dq.inputs.clear()
    dq.outputs.clear()
    if not q.outputs[0].outputs:
        g.nodes.remove(q)
        q.inputs.clear()
        q.outputs.clear()
        if result is not None:
            result.count("activations_quantized", -1)


def _qparams16(lo: float, hi: float, signed: bool) -> tuple[np.float32, np.ndarray]:
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = np.float32((hi - lo) / 65535.0)
    if scale <= 1e-12:
        scale = np.float32(1.0)
    qmin, qmax = (-32768, 32767) if signed else (0, 65535)
    zp = int(np.clip(np.round(qmin - lo / float(scale)), qmin, qmax))
    return scale, np.array(zp, dtype=np.int16 if signed else np.uint16)


# ------------------------------------------------------------------------------------------ entry point
def apply_precision_ladder(
    ctx: PassContext,
    model: onnx.ModelProto,
    plans: list[NodePlan],
    planner: QuantizePlanner,
    opts,
    result: PassResult,
    rewriter,
) -> None:
    """Apply the requested (and, with auto_precision, searched) rungs and rewrite ``ctx.graph`` with
    ``rewriter`` (the pass's configured ``Rewriter``; trial copies get clones of it)."""
    if not 0.0 < opts.precision_floor_cosine <= 1.0 or opts.sensitivity_samples < 1:
        raise UsageError(
            f"precision_floor_cosine must be in (0, 1] and sensitivity_samples >= 1; got "
            f"{opts.precision_floor_cosine} and {opts.sensitivity_samples}"
        )
    keys, _ = _keys(ctx.graph)
    domain = _int16_domain(ctx)
    rungs = _requested_rungs(opts, plans, keys, result)
    if domain is None and "int16" in rungs.values():
        result.notes.append(
            f"16-bit activations need opset >= 21 (or a model that imports com.microsoft); this "
            f"model is opset {ctx.opset}, so the int16_activation_nodes move one rung up "
            "(int8 weights only; float where there is no weight)"
        )
        rungs = {k: ("weight_only" if r == "int16" else r) for k, r in rungs.items()}
    rungs = _normalize(rungs, plans, keys)
    if opts.auto_precision:
        search = _Search(ctx, model, plans, planner, opts, result, _cloner(rewriter), domain, keys)
        rungs = search.run(rungs)
    # No rung asked for or found: the plans as planned (the pass behaves exactly as without the ladder).
    final = _adjust(plans, rungs, keys, planner, ctx.graph) if rungs else plans
    kept = {id(p.node) for p in final}
    for p in plans:
        if id(p.node) not in kept and rungs.get(keys[id(p.node)]) == "float":
            result.skip(p.node, "kept float (float_nodes or auto_precision)", p.graph)
    if "float" in rungs.values():
        _restore_float_biases(ctx.graph, rungs, _original_constants(model), ctx.names)
    rewriter.float_readers = _float_rung_nodes(ctx.graph, rungs)
    rewriter.apply(final, planner)
    if domain is not None and "int16" in rungs.values():
        _widen(ctx.graph, rungs, domain, result, ctx.names)
    planned = {keys[id(p.node)] for p in plans}
    for rung in ("int16", "weight_only", "float"):
        n = sum(1 for k, r in rungs.items() if r == rung and k in planned)
        if n:
            result.count(f"layers_{rung}", n)


# ------------------------------------------------------------------------------------------ search
@dataclass
class _Layer:
    key: Key
    name: str
    op: str
    floor: str  # lowest rung this layer can take
    weights: bool  # has int8 weights (else weight_only is the same as float)
    damage: float = 0.0  # 1 - the score with only this layer quantized


class _Search:
    def __init__(self, ctx, model, plans, planner, opts, result, rewriter, domain, keys):
        self.ctx, self.model, self.plans, self.planner = ctx, model, plans, planner
        self.opts, self.result, self.rewriter, self.domain, self.keys = opts, result, rewriter, domain, keys
        # The float model's outputs on the first sensitivity_samples calibration feeds, with ORT's optimizations
        # off and on: a rung is judged by the worse (ORT's own fusions can undo one: DQ(int8 W) -> MatMul becomes
        # MatMulNBits, which re-quantizes the float activation).
        self.what = {"cosine": "cosine", "decisions": "decision score"}.get(opts.precision_metric, "metric score")
        metric = resolve_criterion(opts.precision_metric)
        self.engine = SensitivityEngine(
            model, ctx.calibration, samples=opts.sensitivity_samples, criterion=metric, progress=ctx.progress
        )
        self.originals = _original_constants(model)

    def cosine(self, rungs: dict[Key, str]) -> float:
        """The score of the model quantized with ``rungs`` (precision_metric: by default its worst output cosine
        over all samples at once)."""
        return self.engine.measure(self.build(rungs)).score

    def build(self, rungs: dict[Key, str]) -> onnx.ModelProto:
        """The model quantized with these rungs, on a copy of the graph (the same code path as the real run)."""
        g = self.ctx.graph.copy()
        c = self.ctx.for_graph(g)
        scratch = PassResult()
        planner = QuantizePlanner(
            self.planner.opts,
            self.planner.types,
            self.planner.per_channel,
            scratch,
            self.planner.shapes,
            depthwise_int8=self.planner.depthwise_int8,
        )
        keys, _ = _keys(g)
        plans = _adjust(planner.plan(g), rungs, keys, planner, g)
        _restore_float_biases(g, rungs, self.originals, c.names)
        rewriter = self.rewriter(c, scratch)
        rewriter.float_readers = _float_rung_nodes(g, rungs)
        rewriter.apply(plans, planner)
        if self.domain is not None:
            _widen(g, rungs, self.domain, None, c.names)
        return _export(g, self.ctx)

    def layers(self, start: dict[Key, str]) -> list[_Layer]:
        out, seen = [], set()
        for p in self.plans:
            k = self.keys[id(p.node)]
            if k in seen or start.get(k) == "float":
                continue
            seen.add(k)
            out.append(_Layer(k, p.node.name, p.node.op, _floor_rung(p), bool(p.weights)))
        return sorted(out, key=lambda lay: lay.key)  # graph order (topological in each graph)

    def next_rung(self, layer: _Layer, rung: str) -> str | None:
        i = RUNGS.index(rung) + 1
        while i < len(RUNGS):
            r = RUNGS[i]
            if r == "int16" and (self.domain is None or layer.floor != "int8"):
                i += 1
                continue
            if r == "weight_only" and not layer.weights:
                i += 1  # no weights: weight-only is the same as float
                continue
            return r
        return None

    def run(self, start: dict[Key, str]) -> dict[Key, str]:
        floor, res = self.opts.precision_floor_cosine, self.result
        budget = float(getattr(self.opts, "sensitivity_time_budget_s", 0) or 0)
        deadline = time.monotonic() + budget if budget > 0 else None
        self.out_of_time = lambda: deadline is not None and time.monotonic() > deadline
        rungs = dict(start)
        layers = self.layers(start)
        base = self.cosine(rungs)
        res.notes.append(
            f"auto_precision: output {self.what} {base:.6f} with the requested rungs "
            f"(floor {floor}; {len(self.engine.feeds)} calibration samples)"
        )
        if base >= floor or not layers:
            res.count("sensitivity_sessions", self.engine.sessions)
            return rungs
        # Probe: each layer quantized alone (the rest float); beyond the cap, the layers nearest the outputs.
        probed = layers[-self.opts.max_sensitivity_layers :] if self.opts.max_sensitivity_layers > 0 else []
        if len(probed) < len(layers):
            res.notes.append(
                f"auto_precision: probed the {len(probed)} layers nearest the outputs of "
                f"{len(layers)} (max_sensitivity_layers)"
            )
        everything_float = {lay.key: "float" for lay in layers}
        by_key = {lay.key: lay for lay in probed}
        revert = self.opts.sensitivity_probe == "revert"
        # revert: the gain of putting each layer back to float in the requested model (its damage among its
        # quantized neighbours, Q/DQ boundaries included); alone: the loss of quantizing it in a float model.
        damages = self.engine.probe(
            (lay.key for lay in probed if not self.out_of_time()),  # lazily: the budget can stop the probes
            (lambda k: self.build({**rungs, k: "float"}))
            if revert
            else (lambda k: self.build({**everything_float, k: start.get(k, by_key[k].floor)})),
            on_result=lambda k, d: res.count("layers_probed"),
        )
        for lay in probed:  # a layer not probed in time is ranked last
            d = damages.get(lay.key)
            lay.damage = 0.0 if d is None else ((1.0 - base) - d.loss if revert else d.loss)
        ranked = sorted(probed, key=lambda lay: -lay.damage)
        res.notes.append(
            "auto_precision: most sensitive layers: "
            + ", ".join(
                f"{lay.name or lay.op} ({self.what} {'with it float' if revert else 'alone'} "
                f"{base + lay.damage if revert else 1 - lay.damage:.6f})"
                for lay in ranked[:5]
            )
        )
        current = base
        for lay in ranked:  # greedy: a move is kept only if it helps; stop once the floor holds
            if current >= floor or self.out_of_time():
                break
            was = rungs.get(lay.key, lay.floor)
            best_rung, best, rung = was, current, was
            while (rung := self.next_rung(lay, rung)) is not None:
                got = self.cosine({**rungs, lay.key: rung})
                res.notes.append(
                    f"auto_precision: tried {lay.name or lay.op} {was} -> {rung}: output {self.what} "
                    f"{current:.6f} -> {got:.6f}"
                )
                if got > best:
                    best_rung, best = rung, got
                if got >= floor:
                    break
            if best_rung != was:
                rungs[lay.key] = best_rung
                current = best
                res.notes.append(f"auto_precision: {lay.name or lay.op} moved {was} -> {best_rung}")
        if self.out_of_time():
            res.notes.append(
                f"auto_precision: stopped at the time budget ({budget:g} s, sensitivity_time_budget_s) after "
                f"{len(damages)} of {len(probed)} probes; the rungs are the best found by then"
            )
        if current < floor:
            res.notes.append(
                f"auto_precision: the floor {floor} was not reached (output {self.what} {current:.6f} "
                "after moving every probed layer up); raise max_sensitivity_layers or add float_nodes"
            )
        res.stats["output_cosine" if self.what == "cosine" else "output_score"] = round(current, 6)
        res.count("sensitivity_sessions", self.engine.sessions)
        return rungs


def _float_rung_nodes(root: gs.Graph, rungs: dict[Key, str]) -> set[int]:
    """Ids of the nodes whose rung keeps their activations float (weight_only, float)."""
    _, by_key = _keys(root)
    return {id(by_key[k][1]) for k, r in rungs.items() if r in ("weight_only", "float") and k in by_key}


def _cloner(proto):
    """A factory of rewriters configured like ``proto`` (attributes the pass set after construction kept)."""

    def make(ctx: PassContext, result: PassResult):
        rw = type(proto)(ctx, result, proto.qparams, proto.opts, proto.types)
        for k, v in vars(proto).items():
            if k not in vars(rw):
                setattr(rw, k, v)
        return rw

    return make


def _original_constants(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    from onnxslim.graph import iter_graphs

    out: dict[str, onnx.TensorProto] = {}
    for g in iter_graphs(model.graph):
        out.update({t.name: t for t in g.initializer})
        for n in g.node:
            if n.op_type == "Constant" and not n.domain:
                for a in n.attribute:
                    if a.name == "value":
                        out[n.output[0]] = a.t
    return out


def _restore_float_biases(
    root: gs.Graph, rungs: dict[Key, str], originals: dict[str, onnx.TensorProto], names: Names
) -> None:
    """Float-rung nodes get back the bias they had before bias correction (their weights stay float, so the
    correction for weight rounding would be an error). A corrected bias is the same name changed in place or a
    private ``<name>_corrected`` copy; a changed one is replaced by a new constant (never mutated: the graph may
    be a trial copy sharing constants with the real one)."""
    _, by_key = _keys(root)
    for key, rung in rungs.items():
        if rung != "float" or key not in by_key:
            continue
        _, node = by_key[key]
        bias = OPS[node.op].bias if node.op in OPS else None
        slots = [(node, bias)] if bias is not None and 0 <= bias < len(node.inputs) else []
        out = node.outputs[0] if bias == FOLLOWING_ADD and node.outputs else None
        if out is not None and len(out.outputs) == 1 and out.outputs[0].op == "Add":
            add = out.outputs[0]
            slots += [(add, i) for i, t in enumerate(add.inputs) if t is not out]
        for owner, i in slots:
            t = owner.inputs[i]
            found = constant_source(t, through_identity=False)
            if found is None:
                continue
            const = found.constant
            base = re.sub(r"_corrected(_\d+)?$", "", t.name)
            orig = originals.get(t.name if t.name in originals else base)
            if orig is None:
                continue
            try:
                values = onnx.numpy_helper.to_array(orig)
                current = np.asarray(const.values)
            except Exception:  # noqa: BLE001 - external data not at hand: leave it
                continue
            if values.shape == current.shape and not np.array_equal(values, current):
                owner.inputs[i] = gs.Constant(names.fresh(f"{t.name}_float"), values)


def _export(graph: gs.Graph, ctx: PassContext) -> onnx.ModelProto:
    graph.toposort(recurse_subgraphs=True)  # a scratch copy: the new Q/DQ nodes were appended at the end
    return export_standalone(graph, ctx.opset)
