"""Which nodes of an int8 model to give back to float first: ranked in the real int8 model, not estimated.

The weight-swap probes (``probe_layers``) see a layer's rounded weights only; what hurts a trained model under
int8 is often the *activations* (a detector head's concatenated box pixels and class scores, a softmax input),
and how the Q/DQ boundaries of neighbours add up. So, once the search has built the all-int8 candidate with
the real quantizer, each quantized node is put back to float *in that model* (its DequantizeLinear inputs
rewired to the float tensors they stand for: the activation before its QuantizeLinear, the base model's float
weight and bias, or only its activations: weight-only int8) and the outputs are scored on calibration data. A
node's gain is how much of the damage that revert alone takes away; its cost, the bytes its weight grows by
(int8 -> fp32, 0 when the weights stay int8). The search gives nodes back in order of gain per byte and
verifies each step with the real quantizer (``weight_only_nodes`` / ``exclude_nodes``) on EVAL.
"""

from __future__ import annotations

from collections.abc import Callable

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


def reverted(
    int8: onnx.ModelProto, base: onnx.ModelProto, names: set[str] | list[str], weights: bool = True
) -> onnx.ModelProto:
    """A copy of ``int8`` with the nodes ``names`` computing in float: each DequantizeLinear input becomes the
    float tensor it decodes (an activation's QuantizeLinear input, else, with ``weights``, the base model's same
    input of the same node, its initializer copied in; without, int8 weights stay: weight-only int8); Q/DQ
    nodes nobody reads any more are dropped."""
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
            elif weights and orig is not None and i < len(orig.input) and orig.input[i] in base_inits:
                node.input[i] = orig.input[i]
                if orig.input[i] not in have:
                    g.initializer.append(base_inits[orig.input[i]])
                    have.add(orig.input[i])
    _drop_dead(g)
    return model


def _drop_dead(g: onnx.GraphProto) -> None:
    needed = {o.name for o in g.output}
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


def rank_reverts(
    base: onnx.ModelProto,
    int8: onnx.ModelProto,
    calibration,
    *,
    weights: bool = False,
    weight_of: dict[str, int] | None = None,
    samples: int = 8,
    criterion: str | Callable[[list[dict], list[dict]], float] = "decisions",
    progress: Callable[[str, int, int | None], None] | None = None,
    threads: int = 1,
) -> tuple[float, list[Revert]]:
    """(all-int8 score, the quantized nodes by gain per byte, best first; those whose revert wins nothing are
    left out), scored by the engine's ``criterion`` (the search's probe criterion). ``weights``: revert
    weights too (else a layer keeps its int8 weights, the same bytes); their cost is then 3 bytes per weight of
    ``weight_of`` (node name -> weight elements)."""
    from ..data import load_feeds
    from ..sensitivity import SensitivityEngine

    engine = SensitivityEngine(
        base,
        load_feeds(calibration).bind(base),
        samples=samples,
        modes=(True,),
        criterion=criterion,
        threads=threads,
        progress=progress,
        stage="auto: int8 reverts",
    )
    nodes = quantized_nodes(int8)
    engine.expected = len(nodes) + 1
    start = engine.measure(int8).score
    ranked = []
    for name in nodes:
        gain = engine.measure(reverted(int8, base, [name], weights)).score - start
        if gain > 1e-9:
            ranked.append(Revert(name, gain, 3.0 * (weight_of or {}).get(name, 0) if weights else 0.0))
    # free reverts (no weight) first, then by gain per byte; a small floor keeps tiny layers from jumping ahead
    ranked.sort(key=lambda r: (-(r.gain / (r.cost + 4096.0)), r.name))
    return start, ranked
