"""Which nodes of an int8 model to give back to float first: ranked in the real int8 model, not estimated.

The weight-swap probes (``probe_layers``) see a layer's rounded weights only; what hurts a trained model under
int8 is often the *activations* (a detector head's concatenated box pixels and class scores, a softmax input),
and how the Q/DQ boundaries of neighbours add up. So, once the search has built the all-int8 candidate with
the real quantizer, each quantized node is put back to float *in that model* (its DequantizeLinear inputs
rewired to the float tensors they stand for: the activation before its QuantizeLinear, the base model's float
weight and bias) and the outputs are scored on calibration data. A node's gain is how much of the damage that
revert alone takes away; its cost is the bytes its weight grows by (int8 -> fp32). The search then gives nodes
back in order of gain per byte and verifies each step with the real quantizer (``exclude_nodes``) on EVAL.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

__all__ = ["quantized_nodes", "reverted", "rank_reverts", "Revert"]

_QDQ = ("QuantizeLinear", "DequantizeLinear")


def quantized_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the main graph's compute nodes that read a DequantizeLinear output, in graph order."""
    made_by_dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    out = []
    for n in model.graph.node:
        if n.op_type not in _QDQ and n.name and any(i in made_by_dq for i in n.input):
            out.append(n.name)
    return list(dict.fromkeys(out))


def reverted(int8: onnx.ModelProto, base: onnx.ModelProto, names: set[str] | list[str]) -> onnx.ModelProto:
    """A copy of ``int8`` with the nodes ``names`` computing in float: each DequantizeLinear input becomes the
    float tensor it decodes (an activation's QuantizeLinear input, else the base model's same input of the same
    node, its initializer copied in); Q/DQ nodes nobody reads any more are dropped."""
    names = set(names)
    model = onnx.ModelProto()
    model.CopyFrom(int8)
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    base_nodes = {n.name: n for n in base.graph.node if n.name}
    base_inits = {t.name: t for t in base.graph.initializer}
    have = {t.name for t in g.initializer}
    for node in g.node:
        if node.name not in names:
            continue
        orig = base_nodes.get(node.name)
        for i, tensor in enumerate(node.input):
            dq = producer.get(tensor)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[i] = q.input[0]
            elif orig is not None and i < len(orig.input) and orig.input[i] in base_inits:
                node.input[i] = orig.input[i]
                if orig.input[i] not in have:
                    g.initializer.append(base_inits[orig.input[i]])
                    have.add(orig.input[i])
    _drop_dead(g)
    return model


def _drop_dead(g: onnx.GraphProto) -> None:
    needed = {o.name for o in g.output}
    for sub in (a.g for n in g.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH):
        needed.update(_outer_reads(sub))
    keep = []
    for n in reversed(list(g.node)):
        if n.op_type in _QDQ and not any(o in needed for o in n.output):
            continue
        keep.append(n)
        needed.update(n.input)
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                needed.update(_outer_reads(a.g))
    del g.node[:]
    g.node.extend(reversed(keep))
    used = {i for n in g.node for i in n.input} | needed
    inits = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(inits)


def _outer_reads(g: onnx.GraphProto) -> set[str]:
    out = {i for n in g.node for i in n.input}
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                out |= _outer_reads(a.g)
    return out


class Revert:
    """One node's entry in the ranking: ``gain`` (score won back by reverting it alone), ``cost`` (bytes)."""

    __slots__ = ("name", "gain", "cost")

    def __init__(self, name: str, gain: float, cost: float):
        self.name, self.gain, self.cost = name, gain, cost

    def to_dict(self) -> dict:
        return {"node": self.name, "gain": self.gain, "bytes": self.cost}


def _decisions(reference: list[dict], candidate: list[dict]) -> float:
    """The engine's ``decisions`` score over float outputs (worst of cosine, worst channel, top-1)."""
    from ..parity_metrics import compare_output, cosine_similarity

    score = 1.0
    for name in reference[0]:
        ref = [np.asarray(r[name]) for r in reference]
        if ref[0].dtype.kind != "f":
            continue
        got = [np.asarray(c[name]) for c in candidate]
        flat = np.concatenate([a.reshape(-1) for a in ref]).astype(np.float64)
        cand = np.concatenate([a.reshape(-1) for a in got]).astype(np.float64)
        score = min(score, float(cosine_similarity(flat, cand)))
        decided = compare_output(name, ref, got, [""] * len(got))["metrics"]
        for key in ("worst_channel_cosine", "top1_agreement"):
            if key in decided:
                score = min(score, float(decided[key]))
    return score


def rank_reverts(
    base: onnx.ModelProto,
    int8: onnx.ModelProto,
    calibration,
    *,
    weight_of: dict[str, int],
    samples: int = 8,
    metric: Callable[[list[dict], list[dict]], float] | None = None,
    progress: Callable[[str, int, int | None], None] | None = None,
) -> tuple[float, list[Revert]]:
    """(all-int8 score, the quantized nodes by gain per byte, best first; those whose revert wins nothing are
    left out). The score is the mean of the user's metric (when given) and the ``decisions`` score, so a revert
    that moves no decision on a few samples still ranks by how much closer its outputs come. ``weight_of``: node
    name -> weight elements (the cost of a revert is 3 bytes per weight: int8 back to fp32)."""
    from ..data import load_feeds
    from ..sensitivity import SensitivityEngine

    def criterion(ref: list[dict], cand: list[dict]) -> float:
        value = _decisions(ref, cand)
        if metric is not None:  # the mean: the engine takes scores <= 1
            value = 0.5 * (value + float(metric(ref, cand)))
        return value

    engine = SensitivityEngine(
        base,
        load_feeds(calibration).bind(base),
        samples=samples,
        modes=(True,),
        criterion=criterion,
        progress=progress,
        stage="auto: int8 reverts",
    )
    nodes = quantized_nodes(int8)
    engine.expected = len(nodes) + 1
    start = engine.measure(int8).score
    ranked = []
    for name in nodes:
        gain = engine.measure(reverted(int8, base, [name])).score - start
        if gain > 1e-9:
            ranked.append(Revert(name, gain, 3.0 * weight_of.get(name, 0)))
    # free reverts (no weight) first, then by gain per byte; a small floor keeps tiny layers from jumping ahead
    ranked.sort(key=lambda r: (-(r.gain / (r.cost + 4096.0)), r.name))
    return start, ranked
