"""The sensitivity engine (onnxslim.sensitivity) on a trained sample model: what one change does to the outputs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxslim.data import load_feeds
from onnxslim.parity_metrics import SNR_CAP_DB
from onnxslim.sensitivity import SensitivityEngine

from conftest import MODELS, SAMPLES

CNN = next(m for m in MODELS if m["name"] == "cnn_digits")


def _with_noise(model: onnx.ModelProto, weight: str, scale: float) -> onnx.ModelProto:
    """The model with Gaussian noise of ``scale`` x the weight's std added to one weight (seeded)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    t = next(i for i in m.graph.initializer if i.name == weight)
    w = onnx.numpy_helper.to_array(t)
    noisy = w + np.random.default_rng(0).standard_normal(w.shape).astype(w.dtype) * w.std() * scale
    t.CopyFrom(onnx.numpy_helper.from_array(noisy.astype(w.dtype), weight))
    return m


@pytest.fixture(scope="module")
def engine_and_model():
    model = onnx.load(str(SAMPLES / CNN["path"]))
    return SensitivityEngine(model, load_feeds(SAMPLES / CNN["calib"]), samples=8), model


def test_the_reference_itself_is_undamaged(engine_and_model):
    engine, model = engine_and_model
    assert len(engine.feeds) == 8  # bounded by samples, not by the data
    d = engine.measure(model)
    assert d.cosine == pytest.approx(1.0, abs=1e-12) and d.max_abs == 0.0 and d.snr_db == SNR_CAP_DB
    assert set(d.outputs) == {"logits"}


def test_damage_grows_with_the_change_and_ranks_it(engine_and_model):
    engine, model = engine_and_model
    before = engine.sessions
    changes = {("stem.0.weight", 0.02): None, ("stem.0.weight", 0.5): None, ("block2.conv2.weight", 0.1): None}
    damages = engine.probe(list(changes), lambda k: _with_noise(model, *k))
    assert engine.sessions == before + 2 * len(changes)  # one session per mode and candidate
    light, heavy = damages[("stem.0.weight", 0.02)], damages[("stem.0.weight", 0.5)]
    assert 0 < light.loss < heavy.loss and light.snr_db > heavy.snr_db and light.max_abs < heavy.max_abs
    ranked = engine.ranked(damages)
    assert ranked.index(("stem.0.weight", 0.5)) < ranked.index(("stem.0.weight", 0.02))
    assert ranked[0] == max(damages, key=lambda k: damages[k].loss)


def _boxes_and_scores(sign: float) -> onnx.ModelProto:
    """y[N, 9] = concat(box pixels x*300 (4 columns), class scores sigmoid(8 * x @ Ws) (5 columns)); ``sign`` flips
    score column 2: one ruined slice among large values, which one cosine over the tensor hardly sees."""
    from onnx import helper, numpy_helper

    ws = np.random.default_rng(1).standard_normal((4, 5)).astype(np.float32) * 8
    ws[:, 2] *= sign
    nodes = [
        helper.make_node("Mul", ["x", "px"], ["box"]),
        helper.make_node("MatMul", ["x", "ws"], ["z"]),
        helper.make_node("Sigmoid", ["z"], ["s"]),
        helper.make_node("Concat", ["box", "s"], ["y"], axis=1),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 9])],
        [numpy_helper.from_array(np.array(300.0, np.float32), "px"), numpy_helper.from_array(ws, "ws")],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_decisions_catch_a_ruined_slice_that_the_whole_tensor_cosine_misses():
    rng = np.random.default_rng(2)
    feeds = [{"x": rng.random((8, 4)).astype(np.float32)} for _ in range(4)]
    reference, ruined = _boxes_and_scores(1.0), _boxes_and_scores(-1.0)
    by_cosine = SensitivityEngine(reference, feeds, samples=4, criterion="cosine").measure(ruined)
    by_decisions = SensitivityEngine(reference, feeds, samples=4, criterion="decisions").measure(ruined)
    assert by_cosine.score > 0.999  # missed: the box pixels dominate the tensor
    assert by_decisions.score < 0.5 and by_decisions.outputs["y"]["worst_channel_cosine"] < 0.5  # caught
    assert by_cosine.cosine == pytest.approx(by_decisions.cosine)

    def same_best_class(ref, cand):  # a user metric: per-sample dicts of outputs, 1.0 = the same decisions
        return float(
            np.mean([np.array_equal(r["y"][:, 4:].argmax(1), c["y"][:, 4:].argmax(1)) for r, c in zip(ref, cand)])
        )

    user = SensitivityEngine(reference, feeds, samples=4, criterion=same_best_class)
    assert user.measure(reference).score == 1.0 and user.measure(ruined).score < 1.0
    with pytest.raises(ValueError, match="criterion must be"):
        SensitivityEngine(reference, feeds, criterion="nearest")


def test_greedy_levels_takes_the_cheapest_loss_per_unit_gained_first():
    from onnxslim.sensitivity import greedy_levels

    # a: cheap per unit; b: expensive; c: cheap at first, then steep.
    losses = {"a": [0.0, 0.01, 0.02], "b": [0.0, 0.5, 0.9], "c": [0.0, 0.001, 0.8]}
    gains = {"a": [0, 10, 20], "b": [0, 10, 20], "c": [0, 10, 20]}
    assert greedy_levels(losses, gains, 30) == {"a": 2, "b": 0, "c": 1}
    assert greedy_levels(losses, gains, 0) == {"a": 0, "b": 0, "c": 0}
    assert greedy_levels(losses, gains, 1000) == {"a": 2, "b": 2, "c": 2}  # cannot reach: everything moved


def test_greedy_levels_stops_at_a_loss_budget():
    from onnxslim.sensitivity import greedy_levels

    losses = {"a": [0.0, 0.01, 0.02], "b": [0.0, 0.5, 0.9]}
    gains = {"a": [0, 10, 20], "b": [0, 10, 20]}
    assert greedy_levels(losses, gains, float("inf"), max_loss=0.015) == {"a": 1, "b": 0}
    assert greedy_levels(losses, gains, float("inf"), max_loss=0.6) == {"a": 2, "b": 1}


def test_weight_probe_measures_against_the_unchanged_model_and_restores_it():
    from types import SimpleNamespace

    import onnx

    from onnxslim.data import load_feeds
    from onnxslim.graph import load_model
    from onnxslim.gs_bridge import import_graph
    from onnxslim.weight_layout import float_weights
    from onnxslim.weight_probe import WeightProbe

    from conftest import SAMPLES

    cnn = SAMPLES / "cnn_digits"
    loaded = load_model(cnn / "model.onnx")
    feeds = load_feeds(cnn / "calib").bind(loaded.proto)
    ctx = SimpleNamespace(graph=import_graph(loaded), opset=17, calibration=feeds, progress=None)
    sites = [s for s in float_weights(ctx.graph, lambda n: True) if s.node.op == "Conv"]
    probe = WeightProbe(ctx, sites, "cosine", samples=4, max_layers=2)
    assert len(probe.measured) == 2
    big = probe.measured[0]
    before = onnx.TensorProto()
    before.CopyFrom(probe._tensors[big.source.constant.name])
    # The first measurement is of a change: the reference must still be the model as it was.
    assert probe.score({id(big): np.zeros(big.source.constant.shape, np.float32)}) < 0.99
    assert probe._tensors[big.source.constant.name] == before  # restored
    assert probe.score({}) == 1.0
