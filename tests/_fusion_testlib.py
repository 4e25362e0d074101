"""Shared bits for the fusion-pass tests: build a tiny model, run a pass under its contract, count ops."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxslim.graph import check_model
from onnxslim.testing import check_pass_contract

RTOL, ATOL = 1e-4, 1e-5
F = TensorProto.FLOAT


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def init(name: str, arr) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(arr), name)


def model(nodes, inputs, outputs, inits=(), opset: int = 17, value_info=()) -> onnx.ModelProto:
    """A checked model from helper pieces; inputs/outputs are (name, shape) or ValueInfoProtos."""

    def vi(x):
        return x if isinstance(x, onnx.ValueInfoProto) else helper.make_tensor_value_info(x[0], F, x[1])

    g = helper.make_graph(
        list(nodes),
        "g",
        [vi(i) for i in inputs],
        [vi(o) for o in outputs],
        initializer=list(inits),
        value_info=[vi(v) for v in value_info],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    # Fill in output shapes given as None, but keep intermediate shape knowledge to what the test gave.
    inferred = onnx.shape_inference.infer_shapes(m)
    for o, io in zip(m.graph.output, inferred.graph.output):
        o.CopyFrom(io)
    check_model(m, full=True)
    return m


def feeds_for(m: onnx.ModelProto, n: int = 2, seed: int = 1) -> list[dict[str, np.ndarray]]:
    r = rng(seed)
    out = []
    for _ in range(n):
        feed = {}
        for i in m.graph.input:
            shape = [d.dim_value if d.dim_value else 2 for d in i.type.tensor_type.shape.dim]
            feed[i.name] = r.standard_normal(shape).astype(np.float32)
        out.append(feed)
    return out


def run_pass(pass_, m: onnx.ModelProto, expect_modified: bool | None = True, feeds=None) -> onnx.ModelProto:
    """The pass under its contract (checker, parity in ORT without optimizations, idempotence)."""
    return check_pass_contract(
        pass_, m, feeds if feeds is not None else feeds_for(m), rtol=RTOL, atol=ATOL, expect_modified=expect_modified
    )


def ops(m_or_graph) -> Counter:
    """Op counts over a model's graph and every subgraph."""
    g = m_or_graph.graph if isinstance(m_or_graph, onnx.ModelProto) else m_or_graph
    c: Counter = Counter()
    for n in g.node:
        c[n.op_type] += 1
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                c.update(ops(a.g))
    return c
