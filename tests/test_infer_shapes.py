"""infer_shapes: intermediate tensors annotated; graph I/O types and dim names never changed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxslim.data import load_feeds
from onnxslim.graph import load_model
from onnxslim.gs_bridge import import_graph
from onnxslim.passes.slim.infer_shapes import InferShapes
from onnxslim.pipeline import optimize
from onnxslim.shape_inference import export_weightless
from onnxslim.testing import assert_outputs_close, check_pass_contract, run_model

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"


def _vi(m: onnx.ModelProto) -> dict[str, list]:
    out = {}
    for vi in m.graph.value_info:
        dims = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in vi.type.tensor_type.shape.dim
        ]
        out[vi.name] = (vi.type.tensor_type.elem_type, dims)
    return out


def test_annotates_intermediates_keeps_io():
    # The output is declared with a dim name inference would not produce ('out_b'): it must stay.
    m = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[batch,4] x) => (float[out_b,2] y) {
      w = Constant<value = float[4,2] {1,2,3,4,5,6,7,8}>()
      h = MatMul(x, w)
      r = Relu(h)
      y = Neg(r)
    }""")
    onnx.checker.check_model(m, full_check=True)
    out = check_pass_contract(InferShapes(), m, [{"x": np.ones((3, 4), np.float32)}], expect_modified=True)
    vi = _vi(out)
    assert vi["h"] == (onnx.TensorProto.FLOAT, ["batch", 2])
    assert vi["r"] == (onnx.TensorProto.FLOAT, ["batch", 2])
    assert out.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "out_b"
    assert out.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_custom_domain_is_skipped_quietly():
    m = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17, "com.example" : 1]>
    g (float[2] x) => (float[2] y) {
      a = Relu(x)
      b = com.example.Magic(a)
      y = Neg(b)
    }""")
    out, rep = optimize(m, ["infer_shapes"], fixed_point=False, check="none", shape_annotations="all")
    assert _vi(out)["a"] == (onnx.TensorProto.FLOAT, [2])
    assert [n.op_type for n in out.graph.node] == ["Relu", "Magic", "Neg"]


def test_weightless_export_carries_no_weight_data():
    w = np.random.default_rng(0).standard_normal((512, 512)).astype(np.float32)  # 1 MiB
    g = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["h"]), onnx.helper.make_node("Relu", ["h"], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", 512])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", 512])],
        [onnx.numpy_helper.from_array(w, "w")],
    )
    m = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 17)])
    m.ir_version = 8
    graph = import_graph(load_model(m))
    light = export_weightless(graph, 17)
    assert light.ByteSize() < 10_000 < m.ByteSize()
    assert np.array_equal(graph.tensors()["w"].values, w)  # the graph keeps its weights
    out = check_pass_contract(InferShapes(), m, [{"x": np.ones((2, 512), np.float32)}], expect_modified=True)
    assert _vi(out)["h"] == (onnx.TensorProto.FLOAT, ["b", 512])


def test_subgraph_values_annotated():
    m = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[3] x, bool c) => (float[3] y) {
      y = If(c) <then_branch = a () => (float[3] o1) { t = Neg(x)  o1 = Relu(t) },
                 else_branch = b () => (float[3] o2) { o2 = Abs(x) }>
    }""")
    out = check_pass_contract(
        InferShapes(), m, [{"x": np.ones(3, np.float32), "c": np.array(True)}], expect_modified=True
    )
    branch = out.graph.node[0].attribute[0].g
    assert any(vi.name == "t" for vi in branch.value_info)


def _entries():
    return json.loads((SAMPLES / "manifest.json").read_text())["models"]


@pytest.mark.parametrize("entry", _entries(), ids=lambda e: e["name"])
def test_sample_models(entry):
    path = SAMPLES / entry["path"]
    model = onnx.load(str(path))
    out, _ = optimize(path, ["infer_shapes"])
    assert len(out.graph.node) == len(model.graph.node)
    for a, b in zip(list(model.graph.input) + list(model.graph.output), list(out.graph.input) + list(out.graph.output)):
        assert a == b
    for feed in load_feeds(SAMPLES / entry["eval"]):
        feed = {k: v for k, v in feed.items() if not k.startswith("__")}
        assert_outputs_close(run_model(model, feed), run_model(out, feed), rtol=1e-5, atol=1e-5)


def test_loop_with_growing_carried_value_still_runs():
    # onnx infers the body's 'acc' as float[1] (its first-iteration shape); annotations must not break runs.
    m = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1] x) => (float[N] y) {
      n = Constant<value = int64 {3}>()
      go = Constant<value = bool {1}>()
      y = Loop(n, go, x) <body = body (int64 i, bool cin, float[1] acc) => (bool cout, float[M] accout) {
        cout = Identity(cin)
        d = Add(acc, acc)
        accout = Concat<axis = 0>(acc, d)
      }>
    }""")
    out = check_pass_contract(InferShapes(), m, [{"x": np.ones(1, np.float32)}])
    body = out.graph.node[-1].attribute[0].g
    for vi in body.value_info:  # nothing claims a static length for the growing tensors
        if vi.name in ("d", "accout"):
            assert not any(d.HasField("dim_value") for d in vi.type.tensor_type.shape.dim)


def test_external_weights_are_never_read(tmp_path, monkeypatch):
    # The inference copy carries dims and dtype only: an external weight's bytes are never loaded.
    from onnxslim import gs_bridge as graph_mod

    w = np.random.default_rng(0).standard_normal((256, 64)).astype(np.float32)
    h = onnx.helper
    g = h.make_graph(
        [
            h.make_node("MatMul", ["x", "w"], ["m"]),
            h.make_node("Shape", ["m"], ["s"]),
            h.make_node("Relu", ["m"], ["y"]),
        ],
        "g",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", 256])],
        [
            h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", 64]),
            h.make_tensor_value_info("s", onnx.TensorProto.INT64, [2]),
        ],
        [onnx.numpy_helper.from_array(w, "w")],
    )
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    path = tmp_path / "m.onnx"
    onnx.save_model(
        m, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="m.data", size_threshold=0
    )

    def refuse(self):
        raise AssertionError("an external weight was read")

    monkeypatch.setattr(graph_mod.ExternalLazyValues, "load", refuse)
    out, rep = optimize(path, ["infer_shapes"], fixed_point=False, check="none", shape_annotations="all")
    assert rep.passes[0].modified
    assert _vi(out)["m"] == (onnx.TensorProto.FLOAT, ["b", 64])
