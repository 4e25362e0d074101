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
