"""The int8 revert ranking of the automatic search (``onnxslim.auto.revert_int8``): a node put back to float in
the real int8 model computes from float tensors, every node put back gives the float model's outputs, the node
whose quantized *activation* ruins the outputs (a planted outlier channel a weight-swap probe cannot see) ranks
first, and ``--auto`` uses the ranking to meet a budget that int8 everywhere misses."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from onnxslim.auto import auto_compress
from onnxslim.auto.revert_int8 import quantized_nodes, rank_reverts, reverted
from onnxslim.auto.search import revert_steps
from onnxslim.pipeline import optimize

from _fusion_testlib import init, model


def _outlier_model() -> onnx.ModelProto:
    """conv1 -> relu -> conv2, where relu's channel 0 is ~5000 and the rest ~1: one per-tensor int8 scale for
    conv2's input rounds channels 1..7 to nothing, while conv2 barely reads channel 0."""
    r = np.random.default_rng(0)
    w1 = r.standard_normal((8, 4, 3, 3)).astype(np.float32) * 0.3
    b1 = np.zeros(8, np.float32)
    b1[0] = 5000.0
    w2 = r.standard_normal((64, 8, 1, 1)).astype(np.float32)
    w2[:, 0] = 1e-4
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["y"], name="conv2"),
    ]
    inits = [init("w1", w1), init("b1", b1), init("w2", w2), init("b2", np.zeros(64, np.float32))]
    return model(nodes, [("x", [1, 4, 8, 8])], [("y", None)], inits)


def _write_feeds(folder, n: int, seed: int):
    folder.mkdir()
    r = np.random.default_rng(seed)
    for i in range(n):
        np.savez(folder / f"{i:03d}.npz", x=r.standard_normal((1, 4, 8, 8)).astype(np.float32))
    return folder


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    d = tmp_path_factory.mktemp("revert")
    src = d / "model.onnx"
    onnx.save(_outlier_model(), src)
    calib, ev = _write_feeds(d / "calib", 8, 1), _write_feeds(d / "eval", 8, 2)
    base, _ = optimize(src, None, seed=0)
    int8, _ = optimize(src, ["quantize_int8_static"], calibration=str(calib), seed=0)
    return d, src, calib, ev, base, int8


def _run(m: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0]


def _cos(a, b) -> float:
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_a_reverted_node_reads_float_tensors_and_the_model_stays_valid(planted):
    *_, base, int8 = planted
    names = quantized_nodes(int8)
    assert "conv2" in names and "conv1" in names
    m = reverted(int8, base, ["conv2"])
    onnx.checker.check_model(m, full_check=True)
    producer = {o: n.op_type for n in m.graph.node for o in n.output}
    conv2 = next(n for n in m.graph.node if n.name == "conv2")
    assert all(producer.get(i) != "DequantizeLinear" for i in conv2.input)
    inits = {t.name: t for t in m.graph.initializer}
    assert onnx.numpy_helper.to_array(inits["w2"]).dtype == np.float32  # the base's float weight, copied in
    conv1 = next(n for n in m.graph.node if n.name == "conv1")
    assert any(producer.get(i) == "DequantizeLinear" for i in conv1.input)  # the others stay int8


def test_every_node_reverted_is_the_float_model(planted):
    *_, base, int8 = planted
    m = reverted(int8, base, quantized_nodes(int8))
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in m.graph.node)
    x = np.random.default_rng(5).standard_normal((1, 4, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(_run(m, x), _run(base, x), rtol=1e-5, atol=1e-4)


def test_the_node_whose_quantized_input_ruins_the_outputs_ranks_first(planted):
    _, _, calib, _, base, int8 = planted
    x = np.random.default_rng(5).standard_normal((1, 4, 8, 8)).astype(np.float32)
    assert _cos(_run(int8, x), _run(base, x)) < 0.9  # the planted damage is real
    weights = {"conv1": 288, "conv2": 512}
    start, ranked = rank_reverts(base, int8, str(calib), weights=True, weight_of=weights, samples=4)
    assert start < 0.9 and ranked and ranked[0].name == "conv2"
    assert ranked[0].gain > 0.09 and ranked[0].cost == 3 * 512
    assert _cos(_run(reverted(int8, base, ["conv2"]), x), _run(base, x)) > 0.99
    # the damage is the activation's: conv2 with its int8 weights and a float input ranks first too, at no cost
    start_a, by_activation = rank_reverts(base, int8, str(calib), samples=4)
    assert start_a == start and by_activation[0].name == "conv2" and by_activation[0].cost == 0.0
    assert _cos(_run(reverted(int8, base, ["conv2"], weights=False), x), _run(base, x)) > 0.99


def test_an_activation_revert_keeps_the_int8_weights(planted):
    *_, base, int8 = planted
    m = reverted(int8, base, ["conv2"], weights=False)
    producer = {o: n for n in m.graph.node for o in n.output}
    conv2 = next(n for n in m.graph.node if n.name == "conv2")
    assert producer[conv2.input[0]].op_type == "Relu"  # the float activation
    assert producer[conv2.input[1]].op_type == "DequantizeLinear"  # the int8 weight, decoded


def test_revert_steps_run_from_all_given_back_to_all_int8():
    steps = revert_steps({"a": "int8", "b": "int8"}, ["b", "head/Concat"])
    assert steps[-1] == {"a": "int8", "b": "int8"}
    assert steps[1] == {"a": "int8"}  # b (a weight layer) leaves the configuration
    assert steps[0] == {"a": "int8", "head/Concat": "float"}  # another node is named at float
    w8 = revert_steps({"a": "int8", "b": "int8"}, ["b", "head/Concat"], "w8")
    assert w8[1] == {"a": "int8", "b": "w8"} and w8[0] == {"a": "int8", "b": "w8", "head/Concat": "float"}


def test_auto_meets_a_budget_int8_everywhere_misses_by_giving_back_the_ranked_node(planted, tmp_path):
    d, src, calib, ev, *_ = planted
    out = tmp_path / "auto.onnx"
    res = auto_compress(
        src,
        out,
        calibration=str(calib),
        eval_data=str(ev),
        budget=0.02,
        levels="int8",
        min_weights=32,
        executor="serial",
        latency=False,
        plots=False,
    )
    auto = res.report.auto
    all_int8 = next(c for c in auto["candidates"] if c["label"] == "all int8")
    assert not all_int8["meets_budget"]
    assert auto["int8_reverts"]["ranked"][0]["node"] == "conv2"
    chosen = next(c for c in auto["candidates"] if c["id"] == auto["chosen"])
    # conv2 keeps int8 weights with a float input: as small as int8 everywhere
    assert res.passed and chosen["config"] == {"conv1": "int8", "conv2": "w8"}
    assert "revert" in chosen["tracks"] and chosen["size"] <= all_int8["size"] + 256
    # an independent check on EVAL: the written model keeps the outputs
    m = onnx.load(out)
    for f in sorted(ev.iterdir()):
        x = np.load(f)["x"]
        assert _cos(_run(m, x), _run(onnx.load(src), x)) > 0.98
