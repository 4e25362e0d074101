"""prune_channels on a trained model (cnn_digits, trained on sklearn digits): recovery from calibration data
must lower the error on held-out data versus no recovery, and the model must get smaller."""

from __future__ import annotations

import numpy as np
import onnx

from onnxslim.pipeline import DEFAULT_PASSES, optimize
from onnxslim.summary import summarize
from onnxslim.testing import run_model

from conftest import SAMPLES, eval_feeds

CNN = SAMPLES / "cnn_digits" / "model.onnx"
CALIB = SAMPLES / "cnn_digits" / "calib"


def _pruned(recovery: str):
    out, report = optimize(
        str(CNN),
        [*DEFAULT_PASSES, f"prune_channels:fraction=0.25,recovery={recovery},channel_multiple=1"],
        calibration=CALIB,
        fixed_point=False,
        on_pass_error="raise",
    )
    onnx.checker.check_model(out, full_check=True)
    return out, next(p for p in report.passes if p.name == "prune_channels")


def test_recovery_lowers_held_out_error_on_a_trained_model():
    feeds = [{k: v for k, v in f.items() if not k.startswith("__")} for f in eval_feeds({"eval": "cnn_digits/eval"})]
    ref = np.concatenate([run_model(str(CNN), f)[0] for f in feeds])
    errors, agreement = {}, {}
    for recovery in ("none", "least_squares"):
        out, record = _pruned(recovery)
        assert record.stats["channels_removed"] > 0
        got = np.concatenate([run_model(out, f)[0] for f in feeds])
        errors[recovery] = float(np.mean((got - ref) ** 2) / np.mean(ref**2))
        agreement[recovery] = float(np.mean(got.argmax(-1) == ref.argmax(-1)))
    assert errors["least_squares"] < 0.5 * errors["none"], errors
    assert agreement["least_squares"] >= agreement["none"], agreement


def test_the_pruned_model_has_fewer_parameters():
    out, record = _pruned("least_squares")
    before = summarize(onnx.load(CNN)).params
    assert summarize(out).params < 0.85 * before
    assert record.stats["params_removed"] > 0
