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
