"""Parity checks from Python: metrics, thresholds, providers, synthetic data, explain, JSON round trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnxslim
from onnxslim.errors import BadInputError, UsageError
from onnxslim.parity import ParityResult, check
from onnxslim.parity_metrics import Threshold, compare_output, merge_floors
from onnxslim.report import Report
from onnxslim.synthetic import infer_int_ranges, parse_shapes, synthetic_feeds

ROOT = Path(__file__).resolve().parents[1] / "sample_models"
CNN = ROOT / "cnn_digits" / "model.onnx"
CNN_EVAL = ROOT / "cnn_digits" / "eval"
TEXT = ROOT / "transformer_text" / "model.onnx"
PLANTED_NODE = "/block1/conv2/Conv"


def planted_cnn(tmp_path: Path, factor: float = 1.5) -> Path:
    """cnn_digits with one Conv's weight scaled: a change in one layer."""
    m = onnx.load(str(CNN))
    node = next(n for n in m.graph.node if n.name == PLANTED_NODE)
    for i, init in enumerate(m.graph.initializer):
        if init.name == node.input[1]:
            w = numpy_helper.to_array(init) * np.float32(factor)
            m.graph.initializer[i].CopyFrom(numpy_helper.from_array(w.astype(np.float32), init.name))
    onnx.checker.check_model(m)
    path = tmp_path / "planted.onnx"
    onnx.save(m, str(path))
    return path


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    return planted_cnn(tmp_path_factory.mktemp("planted"))


# ------------------------------------------------------------------------------------------ end to end
def test_identical_models_pass_with_task_metric():
    r = onnxslim.check(CNN, CNN, data=CNN_EVAL, max_samples=3)
    assert r.passed and r.verdict == "pass"
    out = r.runs[0]["outputs"]["logits"]
    assert out["metrics"]["max_abs"] == 0.0 and out["metrics"]["cosine"] == 1.0
    assert out["metrics"]["top1_agreement"] == 1.0
    assert r.runs[0]["task"]["original"] == r.runs[0]["task"]["candidate"] > 0.9
    assert r.providers["used"] == ["CPUExecutionProvider"]
    assert not r.data["synthetic"] and r.data["samples"] == 3
    # The exact default comes from the noise floor, floored at a few ulps.
    t = out["threshold"]
    assert t["statistic"] == "max" and t["atol"] >= 16 * np.finfo(np.float32).eps
    assert "noise floor" in t["source"]


def test_planted_change_fails_and_explain_names_the_layer(planted):
    r = check(CNN, planted, data=CNN_EVAL, max_samples=2, explain=True)
    assert not r.passed
    assert any("logits" in f and "tolerance" in f for f in r.failures)
    first = r.explain["first_divergent"]
    assert first["node"] == PLANTED_NODE and first["op_type"] == "Conv"
    # Layers before the planted one agree exactly.
    assert r.explain["compared"] > 10


def test_per_output_threshold_overrides_default(planted):
    loose = {"logits": {"atol": 100.0, "rtol": 0.0}}
    assert check(CNN, planted, data=CNN_EVAL, max_samples=1, thresholds=loose).passed
    # A cosine floor alone catches it too (metrics stay the same; only the gate changes).
    strict = {"*": {"atol": None, "cosine": 0.999}}
    r = check(CNN, planted, data=CNN_EVAL, max_samples=1, thresholds=strict)
    assert not r.passed and any("cosine" in f for f in r.failures)
    with pytest.raises(UsageError):
        check(CNN, CNN, data=CNN_EVAL, max_samples=1, thresholds={"nope": {"atol": 1}})


def test_lossy_mode_uses_declared_floors(planted):
    r = check(
        CNN,
        planted,
        data=CNN_EVAL,
        max_samples=2,
        mode="lossy",
        metric_floors={"cosine": 0.5, "channel_cosine": 0.5, "sample_cosine": 0.5, "top1_agreement": 0.5},
    )
    assert r.passed, r.failures
    r = check(CNN, planted, data=CNN_EVAL, max_samples=2, mode="lossy")  # defaults: cosine 0.99, channel 0.95
    assert not r.passed and any("cosine = " in f for f in r.failures)
    assert r.runs[0]["outputs"]["logits"]["threshold"]["cosine"] == 0.99


def test_cuda_requested_on_cpu_machine_is_skipped_or_fails_when_required():
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA in onnxruntime")
    r = check(CNN, CNN, data=CNN_EVAL, max_samples=1, providers="CPU,cuda")
    assert r.passed
    assert r.providers["used"] == ["CPUExecutionProvider"]
    (skip,) = r.providers["skipped"]
    assert skip["provider"] == "CUDAExecutionProvider" and "not in this onnxruntime build" in skip["reason"]
    r = check(CNN, CNN, data=CNN_EVAL, max_samples=1, providers=["cpu", "cuda"], require_providers=True)
    assert not r.passed and any("required provider CUDAExecutionProvider" in f for f in r.failures)
    with pytest.raises(UsageError):
        check(CNN, CNN, data=CNN_EVAL, providers="nosuchthing")


def _cuda_really_runs() -> bool:
    try:
        import onnxruntime as ort

        from onnxslim.runtime import make_session

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return False
        return make_session(str(CNN), "cuda").really_on_requested
    except Exception:
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_really_runs(), reason="no onnxruntime session really runs on CUDA here")
def test_cuda_run_compares_and_reports_drift():
    r = check(CNN, CNN, data=CNN_EVAL, max_samples=2, providers="cpu,cuda", require_providers=True)
    assert r.passed, r.failures
    cuda = next(x for x in r.runs if x["provider"] == "CUDAExecutionProvider")
    assert cuda["session_providers"][0] == "CUDAExecutionProvider"
    assert cuda["provider_drift"]["logits"]["cosine"] > 0.999


def test_integer_inputs_get_valid_synthetic_ids():
    model = onnx.load(str(TEXT), load_external_data=False)
    assert infer_int_ranges(model) == {"input_ids": (0, 241)}  # tok.weight has 241 rows
    feeds = list(synthetic_feeds(model, shapes="input_ids:3x5,attention_mask:3x5", count=3, seed=7))
    assert len(feeds) == 3
    for f in feeds:
        ids, mask = f["input_ids"], f["attention_mask"]
        assert ids.dtype == np.int64 and ids.shape == (3, 5) and 0 <= ids.min() and ids.max() < 241 and ids.any()
        assert mask.dtype == np.int64 and (mask == 1).all()
    again = list(synthetic_feeds(model, shapes="input_ids:3x5,attention_mask:3x5", count=3, seed=7))
    assert all(np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(feeds, again))  # seeded
    r = check(TEXT, TEXT)
    assert r.passed and r.data["synthetic"]
    assert "SYNTHETIC" in r.notes[0] and "synthetic" in r.data["source"]
    assert r.data["plan"]["input_ids"]["values"].startswith("int in [0, 241)")


def test_int_range_found_through_cast_and_unsqueeze():
    m = helper.make_model(
        helper.make_graph(
            [
                helper.make_node("Cast", ["ids"], ["c"], to=onnx.TensorProto.INT32),
                helper.make_node("Unsqueeze", ["c", "axes"], ["u"]),
                helper.make_node("Gather", ["table", "u"], ["y"], axis=0),
            ],
            "g",
            [
                helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["n"]),
                helper.make_tensor_value_info("other", onnx.TensorProto.INT64, [2]),
            ],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
            [
                numpy_helper.from_array(np.zeros((17, 4), np.float32), "table"),
                numpy_helper.from_array(np.array([0], np.int64), "axes"),
            ],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    assert infer_int_ranges(m) == {"ids": (0, 17)}
    (f,) = list(synthetic_feeds(m, count=1, dim=5))
    assert f["ids"].shape == (2,) and f["ids"].max() < 17
    assert f["other"].min() >= 1  # unbounded ints are never all zero


def test_parse_shapes():
    assert parse_shapes("a:1x3x224x224, b:2") == {"a": (1, 3, 224, 224), "b": (2,)}
    for bad in ("a", "a:1xb", "a:0x2", ":3"):
        with pytest.raises(UsageError):
            parse_shapes(bad)
    with pytest.raises(UsageError):
        check(CNN, CNN, shapes="nope:1x1x8x8")
    with pytest.raises(UsageError):
        check(CNN, CNN, shapes="input:1x1x9x8")  # dims 2, 3 are fixed to 8


def test_bad_data_is_bad_input():
    with pytest.raises(BadInputError):
        check(CNN, CNN, data="/nonexistent/data.npz")
    with pytest.raises(BadInputError):
        check(CNN, CNN, data=[{"input": np.zeros((1, 1, 8, 8), np.float64)}])  # wrong dtype


def test_json_report_round_trips(planted):
    r = check(CNN, planted, data=CNN_EVAL, max_samples=1, providers="cpu,cuda", explain=True)
    d = r.to_dict()
    text = json.dumps(d, allow_nan=False)  # strict JSON: no inf/nan anywhere
    back = ParityResult.from_dict(json.loads(text))
    assert back.to_dict() == d and back.passed is False
    for key in ("onnx", "onnxruntime", "onnxslim"):
        assert d["versions"][key]
    assert d["seed"] == 0 and d["providers"]["requested"] == ["CPUExecutionProvider", "CUDAExecutionProvider"]
    rep = Report(parity=d)
    assert Report.from_json(rep.to_json()).to_dict() == rep.to_dict()
    text = rep.render_text(width=140)
    assert "FAIL" in text and PLANTED_NODE in text and "CUDAExecutionProvider" in text


def test_int_outputs_user_metric_and_progress(tmp_path):
    model = ROOT / "sklearn_cancer" / "model.onnx"
    script = tmp_path / "metric.py"
    script.write_text(
        "import numpy as np\n"
        "def agree(ref, cand, samples):\n"
        "    return {'labels_equal': float(np.mean([np.mean(r['label'] == c['label']) "
        "for r, c in zip(ref, cand)])), 'n': len(samples)}\n"
    )
    calls = []
    r = check(
        model,
        model,
        data=ROOT / "sklearn_cancer" / "eval",
        metric=f"{script}:agree",
        progress=lambda stage, done, total: calls.append((stage, done, total)),
    )
    assert r.passed
    label = r.runs[0]["outputs"]["label"]
    assert label["metrics"]["fraction_equal"] == 1.0 and label["threshold"]["fraction_equal"] == 1.0
    assert r.runs[0]["user_metric"] == {"labels_equal": 1.0, "n": 5.0}
    assert r.providers["label_output"] == "label" and r.runs[0]["task"]["original"] > 0.9
    assert calls and calls[-1][1] == calls[-1][2]


# ------------------------------------------------------------------------------------------ metrics
def test_worst_channel_catches_damage_a_global_cosine_hides():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((4, 32, 16)).astype(np.float32)
    ref[:, 0] *= 20  # one dominant channel carries most of the energy
    cand = ref.copy()
    cand[:, 7] = 0.0  # one small channel wiped out
    res = compare_output("y", [ref], [cand], ["x"], Threshold(cosine=0.99, channel_cosine=0.95))
    m = res["metrics"]
    assert m["cosine"] > 0.99  # the whole-tensor number looks fine
    assert m["worst_channel"] == 7 and m["worst_channel_cosine"] < 0.5
    assert not res["passed"] and [c["check"] for c in res["checks"] if not c["passed"]] == ["worst_channel_cosine"]


def test_tolerance_statistics():
    ref = np.linspace(1, 2, 1000, dtype=np.float32)
    cand = ref.copy()
    cand[0] += 2.0  # one outlier
    t = Threshold(atol=1e-3, statistic="max")
    assert not compare_output("y", [ref], [cand], ["x"], t)["passed"]
    assert compare_output("y", [ref], [cand], ["x"], t.updated(statistic="quantile", quantile=0.99))["passed"]
    assert not compare_output("y", [ref], [cand], ["x"], t.updated(statistic="mean"))[
        "passed"
    ]  # mean ratio 2000/1000 > 1
    shape = compare_output("y", [ref], [cand[:10]], ["x"], t)
    assert not shape["passed"] and shape["checks"][0]["check"] == "shape/dtype"
    with pytest.raises(UsageError):
        Threshold(statistic="median")


def test_nan_mismatch_fails_and_snr_is_json_safe():
    ref = np.ones((2, 3), np.float32)
    cand = ref.copy()
    cand[0, 0] = np.nan
    res = compare_output("y", [ref], [cand], ["x"], Threshold(atol=1.0))
    assert res["metrics"]["nonfinite_mismatch"] == 1 and not res["passed"]
    same = compare_output("y", [ref], [ref], ["x"], Threshold(atol=0.0))
    assert same["passed"] and same["metrics"]["snr_db"] == 300.0


def test_merge_floors_takes_the_most_lenient():
    assert merge_floors([{"cosine": 0.99, "accuracy_drop": 0.01}, {"cosine": 0.98, "accuracy_drop": 0.02}]) == {
        "cosine": 0.98,
        "accuracy_drop": 0.02,
    }


def test_installed_provider_that_cannot_run_fails_the_gate(monkeypatch):
    """Issue 14 defect 9: a provider in the build that falls back or fails is a failed gate, not a skip."""
    import onnxslim.parity as parity_mod

    real = parity_mod.available_providers
    monkeypatch.setattr(parity_mod, "available_providers", lambda: [*real(), "CUDAExecutionProvider"])
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA in onnxruntime")
    # onnxruntime, asked for CUDA it cannot load, falls back to CPU: the provider did not run this model.
    r = check(CNN, CNN, data=CNN_EVAL, max_samples=1, providers="cpu,cuda")
    assert not r.passed
    (bad,) = r.providers["failed"]
    assert bad["provider"] == "CUDAExecutionProvider" and "fell back to CPUExecutionProvider" in bad["reason"]
    assert r.providers["skipped"] == [] and r.providers["used"] == ["CPUExecutionProvider"]
    assert any(f.startswith("CUDA: provider is installed but could not run") for f in r.failures)


def test_installed_provider_failing_a_run_fails_the_gate(monkeypatch):
    import onnxslim.parity as parity_mod
    from onnxslim.runtime import SessionInfo

    real_avail, real_make = parity_mod.available_providers, parity_mod.make_session

    class Broken:
        def run(self, *a, **k):
            raise RuntimeError("kernel XYZ is not implemented on this device\nmore lines")

        def get_outputs(self):
            return []

    def make(model, provider="cpu", **kw):
        if provider == "OpenVINOExecutionProvider":
            return SessionInfo(Broken(), provider, [provider, "CPUExecutionProvider"])
        return real_make(model, provider, **kw)

    monkeypatch.setattr(parity_mod, "available_providers", lambda: [*real_avail(), "OpenVINOExecutionProvider"])
    monkeypatch.setattr(parity_mod, "make_session", make)
    r = check(CNN, CNN, data=CNN_EVAL, max_samples=1, providers="cpu,openvino")
    assert not r.passed
    (bad,) = r.providers["failed"]
    assert "kernel XYZ is not implemented" in bad["reason"] and "more lines" not in bad["reason"]
    # The CPU run still happened and passed: the failure names the provider, not the model.
    assert [x["provider"] for x in r.runs] == ["CPUExecutionProvider"] and r.runs[0]["passed"]


def test_worst_channel_axis_default_and_override():
    from onnxslim.parity_metrics import compare_output, default_channel_axis

    assert default_channel_axis([1, 22, 2100], (1, 22, 2100)) == 1  # detector rows: boxes + class scores
    assert default_channel_axis([1, 2100, 22], (1, 2100, 22)) == 2
    assert default_channel_axis(["batch", "seq", 384], (2, 16, 384)) == 2  # a named dim is not a channel
    assert default_channel_axis([1, 80, 40, 40], (1, 80, 40, 40)) == 1  # feature maps: C
    assert default_channel_axis(["batch", 10], (4, 10)) == 1
    # One bad anchor column of a [1, 6, 50] detector output is the worst "channel" only along axis 2.
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((1, 6, 50)).astype(np.float32)
    cand = ref.copy()
    cand[0, :, 17] = -cand[0, :, 17]
    along2 = compare_output("y", [ref], [cand], ["s"], channel_axis=2)["metrics"]
    along1 = compare_output("y", [ref], [cand], ["s"], channel_axis=1)["metrics"]
    assert along2["channel_axis"] == 2 and along2["worst_channel"] == 17 and along2["worst_channel_cosine"] < -0.99
    assert along1["worst_channel_cosine"] > 0.5


def test_channel_axes_reach_the_report_and_bad_ones_are_refused():
    r = check(CNN, CNN, data=CNN_EVAL, max_samples=1)
    assert r.runs[0]["outputs"]["logits"]["metrics"]["channel_axis"] == 1
    with pytest.raises(UsageError, match="not an output"):
        check(CNN, CNN, data=CNN_EVAL, max_samples=1, channel_axes={"nope": 1})
    with pytest.raises(UsageError, match="give an axis 1..1"):
        check(CNN, CNN, data=CNN_EVAL, max_samples=1, channel_axes="logits:0")
