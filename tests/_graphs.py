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
