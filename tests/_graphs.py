"""Small helpers shared by the pass tests."""

from __future__ import annotations

import onnx


def parse_checked(text: str) -> onnx.ModelProto:
    """A model from ONNX text, checked in full (a test graph that is itself invalid proves nothing)."""
    m = onnx.parser.parse_model(text)
    onnx.checker.check_model(m, full_check=True)
    return m


def op_types(m: onnx.ModelProto) -> list[str]:
    """Op types of every node, subgraphs included, depth first."""
    out: list[str] = []

    def walk(g: onnx.GraphProto) -> None:
        for n in g.node:
            out.append(n.op_type)
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)

    walk(m.graph)
    return out


def optimize_sample_model(entry: dict, passes: list[str], rtol: float = 1e-5, atol: float = 1e-5) -> onnx.ModelProto:
    """Run ``passes`` on a sample model; assert the node count does not grow and eval outputs stay close."""
    from pathlib import Path

    from onnxslim.data import load_feeds
    from onnxslim.pipeline import optimize
    from onnxslim.testing import assert_outputs_close, run_model

    samples = Path(__file__).resolve().parents[1] / "sample_models"
    path = samples / entry["path"]
    model = onnx.load(str(path))
    out, _ = optimize(path, passes)
    assert len(op_types(out)) <= len(op_types(model))
    for feed in load_feeds(samples / entry["eval"]):
        assert_outputs_close(run_model(model, feed), run_model(out, feed), rtol=rtol, atol=atol)
    return out


def stored_weight(m: onnx.ModelProto, name: str) -> tuple[str, onnx.TensorProto] | None:
    """How the weight tensor ``name`` (read in any graph) is stored: ("dequantize_linear", int8 tensor) for
    DequantizeLinear(int8), ("cast_mul", int8 tensor) for Mul(Cast(int8), scale), ("float", tensor) for a float
    initializer; None if none of these. Producers and initializers are looked up across all graphs (outer scope)."""
    producers: dict[str, onnx.NodeProto] = {}
    inits: dict[str, onnx.TensorProto] = {}

    def walk(g: onnx.GraphProto) -> None:
        inits.update({t.name: t for t in g.initializer})
        for n in g.node:
            producers.update({o: n for o in n.output})
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)

    walk(m.graph)
    if name in inits:
        return "float", inits[name]
    p = producers.get(name)
    if p is not None and p.op_type == "DequantizeLinear" and p.input[0] in inits:
        return "dequantize_linear", inits[p.input[0]]
    if p is not None and p.op_type == "Mul":
        cast = next((producers[i] for i in p.input if i in producers and producers[i].op_type == "Cast"), None)
        if cast is not None and cast.input[0] in inits:
            return "cast_mul", inits[cast.input[0]]
    return None


def non_finite_inside(feeds: list[dict], name: str = "x", divisor: str = "d") -> list[dict]:
    """Feeds whose NaN/Inf values in ``name`` are made inside the model instead: ``name`` becomes finite and a
    second input ``divisor`` is 0 there (0/0 = NaN, +-1/0 = +-Inf), 1 elsewhere, for a model computing
    ``Div(name, divisor)``. Data must be finite (it is refused otherwise); activations may not be."""
    import numpy as np

    out = []
    for f in feeds:
        x = np.asarray(f[name])
        bad = ~np.isfinite(x)
        fixed = np.where(np.isnan(x), 0.0, np.where(np.isinf(x), np.sign(np.nan_to_num(x)), x)).astype(x.dtype)
        out.append({**f, name: fixed, divisor: np.where(bad, 0.0, 1.0).astype(x.dtype)})
    return out
