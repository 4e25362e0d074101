"""Latency in the optimize report: structure and consistency only (no timing thresholds: machines differ)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxslim import latency as lat
from onnxslim.cli import main
from onnxslim.graph import load_model
from onnxslim.pipeline import optimize
from onnxslim.report import PassRecord, Report

from conftest import SAMPLES

CNN = SAMPLES / "cnn_digits" / "model.onnx"
CNN_CALIB = SAMPLES / "cnn_digits" / "calib"
CNN_EVAL = SAMPLES / "cnn_digits" / "eval"
FAST = dict(warmup=1, min_runs=5, max_runs=20, budget_s=0.5)


@pytest.fixture(scope="module")
def slim(tmp_path_factory):
    out = tmp_path_factory.mktemp("lat") / "slim.onnx"
    optimize(CNN, output=out)
    return out


def _thread_counts() -> list[int]:
    return list(dict.fromkeys([1, lat.cpu_count()]))


def test_measures_both_thread_settings_consistently(slim):
    feeds, source, desc = lat.latency_feeds(load_model(CNN).proto, CNN_CALIB)
    assert source == "calibration" and "calib" in desc
    r = lat.measure_latency(CNN, slim, feeds, feeds_source=source, feeds_description=desc, **FAST)
    assert r["measured"] and r["reason"] is None, r["reason"]
    assert r["graph_optimization"] == "ORT_ENABLE_ALL" and r["order"] == "interleaved"
    assert [s["threads"] for s in r["settings"]] == _thread_counts()
    for s in r["settings"]:
        assert s["inter_op_threads"] == 1 and s["intra_op_threads"] == s["threads"]
        assert FAST["min_runs"] <= s["runs"] <= FAST["max_runs"]
        for side in ("original", "candidate"):
            m = s[side]
            assert m["median_ms"] > 0
            assert m["min_ms"] <= m["p10_ms"] <= m["median_ms"] <= m["p90_ms"]
        assert s["ratio"] == pytest.approx(s["candidate"]["median_ms"] / s["original"]["median_ms"], rel=1e-3)
    assert r["machine"]["cpus"] == lat.cpu_count() and r["machine"]["machine"]
    json.dumps(r, allow_nan=False)  # plain, finite JSON


def test_runs_are_interleaved_and_warmup_excluded(slim, monkeypatch):
    from onnxslim import runtime

    which: dict[int, str] = {}
    real_make = runtime.make_session

    def tagged(model, *a, **k):
        info = real_make(model, *a, **k)
        which[id(info.session)] = "original" if str(model) == str(CNN) else "candidate"
        return info

    calls: list[str] = []

    def fake_run(session, feeds):
        calls.append(which[id(session)])
        return 0.002 if which[id(session)] == "original" else 0.001  # seconds

    monkeypatch.setattr(runtime, "make_session", tagged)
    monkeypatch.setattr(lat, "_run_once", fake_run)
    feeds = lat.latency_feeds(load_model(CNN).proto, CNN_CALIB)[0]
    r = lat.measure_latency(CNN, slim, feeds, threads=(1,), warmup=2, min_runs=3, max_runs=7, budget_s=60)
    assert r["measured"], r["reason"]
    assert calls == ["original", "candidate"] * (2 + 7)  # A, B, A, B, ...: 2 warm-up rounds, then 7 timed
    s = r["settings"][0]
    assert s["runs"] == 7 and s["stopped"] == "max_runs"
    assert s["original"]["median_ms"] == pytest.approx(2.0) and s["candidate"]["median_ms"] == pytest.approx(1.0)
    assert s["ratio"] == pytest.approx(0.5)


def test_budget_stops_at_the_minimum_runs(slim):
    feeds = lat.latency_feeds(load_model(CNN).proto, CNN_CALIB)[0]
    r = lat.measure_latency(
        CNN, slim, feeds, threads=(1,), warmup=1, min_runs=4, max_runs=1000, budget_s=0.0, limit_s=60
    )
    s = r["settings"][0]
    assert s["runs"] == 4 and s["stopped"] == "budget"


def _tiny(body: list, name: str) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    inits = [helper.make_tensor("shape", TensorProto.INT64, [1], [3])]
    g = helper.make_graph(body, name, [x], [y], initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_failing_candidate_gives_a_reason_and_does_not_raise(tmp_path):
    original = _tiny([helper.make_node("Identity", ["x"], ["y"])], "ok")
    feeds = {"x": np.ones((1, 4), np.float32)}
    # loads, but fails when run: 4 elements cannot be reshaped to [3]
    bad_run = _tiny([helper.make_node("Reshape", ["x", "shape"], ["y"])], "bad")
    r = lat.measure_latency(original, bad_run, feeds, **FAST)
    assert not r["measured"] and "candidate" in r["reason"] and "\n" not in r["reason"]
    assert r["settings"] == []
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    r = lat.measure_latency(original, garbage, feeds, **FAST)
    assert not r["measured"] and "candidate" in r["reason"]
    r = lat.measure_latency(original, original, {"other": feeds["x"]}, **FAST)
    assert not r["measured"] and "x" in r["reason"]
    r = lat.measure_latency(original, original, [], **FAST)
    assert not r["measured"] and "feeds" in r["reason"]


def test_feeds_come_from_calibration_then_check_data_then_synthetic():
    proto = load_model(CNN).proto
    assert lat.latency_feeds(proto, CNN_CALIB, CNN_EVAL)[1] == "calibration"
    feeds, source, _ = lat.latency_feeds(proto, None, CNN_EVAL)
    assert source == "check data" and "__label__" not in feeds
    feeds, source, desc = lat.latency_feeds(proto)
    assert source == "synthetic" and desc.startswith("synthetic") and feeds


def test_pipeline_measures_only_when_asked_written_and_changed(tmp_path):
    _, report = optimize(CNN, output=tmp_path / "a.onnx")
    assert report.latency is None  # the Python API default is off
    _, report = optimize(CNN, output=tmp_path / "b.onnx", latency=True, calibration=CNN_CALIB)
    assert report.latency["measured"] and report.latency["feeds"] == "calibration"
    assert report.latency["candidate"] == str(tmp_path / "b.onnx")
    _, report = optimize(CNN, latency=True)
    assert not report.latency["measured"] and "output" in report.latency["reason"]
    _, report = optimize(CNN, ["eliminate_dead_nodes"], output=tmp_path / "c.onnx", latency=True)
    assert not any(p.modified for p in report.passes)
    assert not report.latency["measured"] and "no pass changed" in report.latency["reason"]
    assert Report.from_json(report.to_json()).to_dict() == report.to_dict()


def test_cli_reports_latency_by_default_and_not_with_no_latency(tmp_path, capsys):
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    assert main(["optimize", str(CNN), "-o", str(out), "--report", str(rep)]) == 0
    text = capsys.readouterr().out
    assert "latency (onnxruntime CPU, ORT_ENABLE_ALL, interleaved" in text and "1 thread:" in text
    report = Report.from_json(rep.read_text())
    assert report.latency["measured"] and report.latency["feeds"] == "synthetic"
    assert [s["threads"] for s in report.latency["settings"]] == _thread_counts()
    assert Report.from_json(report.to_json()).to_dict() == report.to_dict()
    assert main(["optimize", str(CNN), "-o", str(out), "--report", str(rep), "--no-latency", "-q"]) == 0
    assert Report.from_json(rep.read_text()).latency is None
    assert "latency" not in capsys.readouterr().out


def test_text_shows_latency_and_the_facts_the_int8_target_with_its_cpu_flags():
    def stats(ms):
        return {"median_ms": ms, "p10_ms": ms * 0.9, "p90_ms": ms * 1.2, "min_ms": ms * 0.8}

    settings = [
        {"threads": t, "runs": 50, "original": stats(0.84), "candidate": stats(1.26), "ratio": 1.5} for t in (1, 8)
    ]
    report = Report(
        passes=[
            PassRecord(
                "quantize_int8_static",
                {},
                False,
                modified=True,
                notes=[
                    "target x86-avx2 (detected on this machine): uint8 activations, 7-bit weights; "
                    "CPU flags: avx2 (absent: avx512_vnni)"
                ],
            )
        ],
        latency={
            "measured": True,
            "settings": settings,
            "feeds": "calibration",
            "feeds_description": "directory calib (4 files)",
            "machine": {"cpus": 8, "machine": "x86_64"},
        },
    )
    text = report.render_text(width=200)
    lines = text[text.index("latency (") :].splitlines()
    assert lines[0] == "latency (onnxruntime CPU, ORT_ENABLE_ALL, interleaved, median of 50 runs):"
    assert "1 thread: 0.840 -> 1.26 ms (1.50x), p10-p90 0.756-1.01 -> 1.13-1.51" in lines[1]
    assert lines[2].startswith("  8 threads:")
    facts = " ".join(text[text.index("facts:") :].split())
    assert "target x86-avx2 (detected on this machine)" in facts and "CPU flags: avx2 (absent: avx512_vnni)" in facts
    assert all(len(line) <= 80 for line in lines if "checker" not in line)
    assert Report.from_json(report.to_json()).to_dict() == report.to_dict()
    none = Report(latency=lat.not_measured("no output was written")).render_text()
    assert "latency: not measured: no output was written" in none
