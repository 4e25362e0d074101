"""Calibration statistics as a shared service: one streaming run per request, answers reused by model state."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxslim import Pass, PassResult, calibration_service, optimize, register_pass, registry
from onnxslim.calibration_service import CalibrationService, StatisticsRequest
from onnxslim.data import load_feeds
from onnxslim.errors import UsageError

from conftest import MODELS, SAMPLES

CNN = next(m for m in MODELS if m["name"] == "cnn_digits")
MODEL = SAMPLES / CNN["path"]
CALIB = SAMPLES / CNN["calib"]
CONV_OUT = "/stem/stem.0/Conv_output_0"


def _inputs():
    return [f["input"] for f in load_feeds(CALIB)]


def test_one_run_answers_a_merged_request_and_matches_numpy():
    model = onnx.load(str(MODEL))
    service = CalibrationService(load_feeds(CALIB))
    ranges = StatisticsRequest(tensors=("input", CONV_OUT))
    importance = StatisticsRequest(norms={"input": 1}, means={CONV_OUT: 1}, grams={"input": 1})
    teacher = StatisticsRequest(keep=("logits",), keep_samples=3)
    stats = service.statistics(model, ranges | importance | teacher)
    assert service.runs == 1
    xs = _inputs()
    flat = np.concatenate([x.reshape(-1) for x in xs]).astype(np.float64)
    assert stats["input"].min == flat.min() and stats["input"].max == flat.max()
    per_channel = np.concatenate([np.moveaxis(x, 1, 0).reshape(x.shape[1], -1) for x in xs], axis=1).astype(np.float64)
    np.testing.assert_allclose(stats["input"].channel_norm, np.sqrt((per_channel**2).sum(axis=1)), rtol=1e-12)
    np.testing.assert_allclose(stats["input"].gram, per_channel @ per_channel.T, rtol=1e-9)
    assert stats[CONV_OUT].channel_mean.shape == (stats[CONV_OUT].channel_mean.size,)
    sess = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    assert len(stats.values["logits"]) == 3
    for kept, x in zip(stats.values["logits"], xs):
        np.testing.assert_allclose(kept, sess.run(None, {"input": x})[0], rtol=1e-5, atol=1e-6)


def test_answers_are_reused_for_the_same_model_state_only():
    model = onnx.load(str(MODEL))
    service = CalibrationService(load_feeds(CALIB))
    service.statistics(model, StatisticsRequest(tensors=("input",), means={"input": 1}))
    again = service.statistics(onnx.load(str(MODEL)), StatisticsRequest(means={"input": 1}))  # a subset
    assert service.runs == 1 and again["input"].channel_mean is not None
    service.statistics(model, StatisticsRequest(norms={"input": 1}))  # not collected yet: a new run
    assert service.runs == 2
    changed = onnx.load(str(MODEL))
    w = onnx.numpy_helper.to_array(changed.graph.initializer[1]).copy()
    changed.graph.initializer[1].CopyFrom(onnx.numpy_helper.from_array(w * 2, changed.graph.initializer[1].name))
    service.statistics(changed, StatisticsRequest(tensors=("input",), means={"input": 1}))  # another state
    assert service.runs == 3


def _doubled(index: int = 1) -> onnx.ModelProto:
    changed = onnx.load(str(MODEL))
    w = onnx.numpy_helper.to_array(changed.graph.initializer[index]).copy()
    changed.graph.initializer[index].CopyFrom(
        onnx.numpy_helper.from_array(w * 2, changed.graph.initializer[index].name)
    )
    return changed


@pytest.mark.parametrize("keep_states, runs", [(1, 4), (2, 3)])
def test_keep_states_keeps_the_base_models_answers_beside_a_variants(keep_states, runs):
    """Base, a variant, the base again, a second variant: with keep_states=2 the base's answer survives the
    variant (what the automatic search's workers use: every candidate starts from the same base)."""
    base, request = onnx.load(str(MODEL)), StatisticsRequest(tensors=("input", CONV_OUT))
    service = CalibrationService(load_feeds(CALIB), keep_states=keep_states)
    first = service.statistics(base, request)
    service.statistics(_doubled(1), request)
    again = service.statistics(base, request)
    assert again[CONV_OUT].max == first[CONV_OUT].max
    service.statistics(_doubled(2), request)
    assert service.runs == runs


def test_requests_along_two_axes_do_not_merge():
    with pytest.raises(UsageError, match="disagree on the means axis of x"):
        StatisticsRequest(means={"x": 1}) | StatisticsRequest(means={"x": 0})


def test_a_pass_run_makes_one_streaming_run(monkeypatch):
    calls = []
    real = calibration_service.collect_statistics
    monkeypatch.setattr(
        calibration_service, "collect_statistics", lambda *a, **k: calls.append(k.get("grams")) or real(*a, **k)
    )
    optimize(MODEL, ["quantize_int8_static:target=x86-avx2"], calibration=CALIB)
    assert len(calls) == 1 and calls[0]  # ranges, means and GPTQ Grams: one run over the data


def test_passes_share_answers_through_the_context(monkeypatch):
    calls = []
    real = calibration_service.collect_statistics
    monkeypatch.setattr(calibration_service, "collect_statistics", lambda *a, **k: calls.append(1) or real(*a, **k))
    seen = []

    @register_pass("test_service_reader")
    class Reader(Pass):
        exact = True
        needs_calibration = True

        def run(self, ctx):
            seen.append(ctx.statistics(StatisticsRequest(norms={"input": 1}))["input"].channel_norm)
            return PassResult()

    try:
        optimize(MODEL, ["test_service_reader", "test_service_reader"], calibration=CALIB, fixed_point=False)
    finally:
        registry.unregister_pass("test_service_reader")
    assert len(calls) == 1 and len(seen) == 2 and np.array_equal(seen[0], seen[1])


def test_a_pass_gets_the_original_models_outputs_as_teacher():
    seen = []

    @register_pass("test_service_teacher")
    class Teacher(Pass):
        exact = True
        needs_calibration = True

        def run(self, ctx):
            request = StatisticsRequest(keep=("/stem/stem.1/BatchNormalization_output_0",), keep_samples=2)
            seen.append(ctx.statistics(request, model=ctx.original_model))
            return PassResult()

    try:
        # the BatchNormalization is fused away before the teacher asks: its output exists in the original only
        optimize(MODEL, ["fuse_batchnorm_into_conv", "test_service_teacher"], calibration=CALIB, fixed_point=False)
    finally:
        registry.unregister_pass("test_service_teacher")
    kept = seen[0].values["/stem/stem.1/BatchNormalization_output_0"]
    model = onnx.load(str(MODEL))
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info("/stem/stem.1/BatchNormalization_output_0"))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert len(kept) == 2
    for got, x in zip(kept, _inputs()):
        np.testing.assert_allclose(
            got, sess.run(["/stem/stem.1/BatchNormalization_output_0"], {"input": x})[0], rtol=1e-5, atol=1e-6
        )
