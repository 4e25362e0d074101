"""Automatic compression under a budget (``optimize --auto``): the budget holds on EVAL by an independent oracle,
the result beats int8 alone, the pictures and their data are produced, executors agree, the cache resumes, and
an impossible budget exits 1 with the best model found."""

from __future__ import annotations

import json
import math

import numpy as np
import onnxruntime as ort
import pytest

from onnxslim import load_feeds
from onnxslim.auto import auto_compress, parse_levels
from onnxslim.auto.plan_search import Objective, checkpoints, greedy_path, pareto_front
from onnxslim.cli import main

from conftest import SAMPLES

CNN = SAMPLES / "cnn_digits"
MODEL, CALIB, EVAL = str(CNN / "model.onnx"), str(CNN / "calib"), str(CNN / "eval")


def _accuracy(path) -> float:
    """Independent of the search's own metric: argmax of the logits against the labels, plain onnxruntime."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    hits = total = 0
    for s in load_feeds(EVAL).samples():
        logits = sess.run(None, s.feeds)[0]
        y = s.meta["__label__"].reshape(-1)
        hits += int((logits.argmax(axis=1) == y).sum())
        total += y.size
    return hits / total


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("auto")
    out, report = d / "cnn.auto.onnx", d / "report.json"
    args = ["optimize", MODEL, "-o", str(out), "--auto", "--calib", CALIB, "--check-data", EVAL, "--budget", "0.01"]
    rc = main([*args, "--auto-min-weights", "256", "--auto-executor", "serial", "--report", str(report), "-q"])
    int8 = d / "cnn.int8.onnx"
    rc_int8 = main(["optimize", MODEL, "-o", str(int8), "--quantize", "int8", "--calib", CALIB, "-q", "--no-latency"])
    return rc, out, json.loads(report.read_text()), rc_int8, int8


def test_auto_meets_the_budget_on_eval_and_beats_int8_alone(cli_run):
    rc, out, report, rc_int8, int8 = cli_run
    assert rc == 0 and rc_int8 == 0
    base = _accuracy(MODEL)
    assert base - _accuracy(out) <= 0.01 + 1e-9
    assert out.stat().st_size < int8.stat().st_size
    auto = report["auto"]
    chosen = next(c for c in auto["candidates"] if c["id"] == auto["chosen"])
    assert chosen["meets_budget"] and auto["passed"] and auto["written_as_evaluated"]
    assert abs(auto["metric"]["base_value"] - base) < 1e-9 and auto["metric"]["kind"] == "accuracy"
    assert not (out.parent / (out.name + ".auto-cache")).exists()  # removed after a successful search


def test_auto_report_has_the_front_the_sensitivity_and_their_pictures(cli_run):
    _, out, report, _, _ = cli_run
    auto = report["auto"]
    levels = set(auto["levels"])
    assert levels == {"int8", "share6", "share5", "share4", "share3"}
    assert len(auto["sensitivity"]) == len(auto["layers"]) >= 5
    for row in auto["sensitivity"].values():
        assert set(row) == levels
        # fewer bits cannot be better than more on a trained layer's weights (each alone, on calibration data)
        assert row["share3"] >= row["share6"] - 1e-6
    measured = {c["id"]: c for c in auto["candidates"] if "size_ratio" in c}
    front = [measured[i] for i in auto["pareto"]]
    for c in front:  # nothing measured beats a front point on both size and drop
        assert not any(
            o["objective"] < c["objective"] and max(o["drop"], 0) < max(c["drop"], 0) for o in measured.values()
        )
    assert auto["chosen"] in auto["pareto"]
    stages = auto["stage_seconds"]  # where the wall time went: every stage of this search, adding up to it
    assert {"lossless base", "sensitivity probes", "candidates", "latency", "write chosen"} <= set(stages)
    assert all(v >= 0 for v in stages.values()) and sum(stages.values()) <= auto["search_seconds"] + 0.01
    assert sum(stages.values()) >= 0.9 * auto["search_seconds"]
    for name in ("pareto", "sensitivity"):
        png = out.parent / f"{out.stem}.{name}.png"
        assert auto["plots"][name] == str(png)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_impossible_budget_exits_1_with_the_best_model_found(tmp_path, capsys):
    script = tmp_path / "metric.py"
    script.write_text(
        "import numpy as np\n"
        "def identical(reference, candidate, samples):\n"
        "    return float(all(np.array_equal(r[k], c[k]) for r, c in zip(reference, candidate) for k in r))\n"
    )
    out = tmp_path / "m.onnx"
    rc = main(
        ["optimize", MODEL, "-o", str(out), "--auto", "--calib", CALIB, "--check-data", EVAL, "--budget", "0.5"]
        + ["--metric", f"{script}:identical", "--auto-min-weights", "256", "--auto-executor", "serial"]
        + ["--no-latency", "--no-plots"]
    )
    text = capsys.readouterr().out
    assert rc == 1
    assert not out.exists()
    failed = tmp_path / "m.failed.onnx"
    assert failed.exists() and "no compressed model keeps the metric within --budget" in text
    assert "best found" in text


def test_ray_executor_gives_the_local_result(tmp_path):
    pytest.importorskip("ray")
    kwargs = dict(calibration=CALIB, eval_data=EVAL, budget=0.01, min_weights=256, latency=False, plots=False)
    local = auto_compress(MODEL, tmp_path / "a.onnx", executor="local", workers=2, **kwargs)
    ray_run = auto_compress(MODEL, tmp_path / "b.onnx", executor="ray", workers=2, **kwargs)
    import ray

    ray.shutdown()
    assert ray_run.report.auto["executor"].startswith("ray")

    def facts(r):
        return [(c["config"], c["size"], c["value"]) for c in r.report.auto["candidates"]], r.report.auto["chosen"]

    assert facts(local) == facts(ray_run)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def _pid(_task) -> int:
    import os

    return os.getpid()


def test_local_executor_keeps_its_workers_between_rounds_until_closed():
    from onnxslim.auto import ProcessExecutor

    with ProcessExecutor(2) as ex:
        first = set(ex.map(_pid, list(range(6))))
        second = set(ex.map(_pid, list(range(6))))
        # the same processes answer both rounds (what a worker built for the search is kept)
        assert len(first | second) <= 2 and ex._pool is not None
    assert ex._pool is None


def test_probe_table_does_not_depend_on_the_thread_count(tmp_path):
    import onnx

    from onnxslim.auto.levels import weight_layers
    from onnxslim.auto.probe_layers import probe_layers
    from onnxslim.pipeline import optimize

    base = tmp_path / "base.onnx"
    optimize(MODEL, None, output=base, seed=0, external_data=False)
    layers = weight_layers(onnx.load(str(base)), 256)
    menu = parse_levels("int8,share3")
    one, two = (probe_layers(str(base), layers, menu, CALIB, samples=4, threads=t) for t in (1, 2))
    assert one == two and any(math.isfinite(v) and v > 0 for d in one.values() for v in d.values())


def test_interrupted_search_resumes_from_the_cache(tmp_path):
    cache = tmp_path / "cache"
    kwargs = dict(calibration=CALIB, eval_data=EVAL, min_weights=256, executor="serial", latency=False, plots=False)
    first = auto_compress(MODEL, tmp_path / "a.onnx", cache_dir=cache, **kwargs)
    n = len(first.report.auto["candidates"])
    assert first.report.auto["cache"]["hits"] == 0 and cache.exists()
    victim = sorted(cache.glob("*.json"))[0]
    if victim.name.startswith("sensitivity"):
        victim = sorted(cache.glob("*.json"))[1]
    victim.unlink()  # as if the run had been killed before that candidate finished
    again = auto_compress(MODEL, tmp_path / "b.onnx", cache_dir=cache, **kwargs)
    assert again.report.auto["cache"]["hits"] == n - 1
    assert [c["value"] for c in again.report.auto["candidates"]] == [
        c["value"] for c in first.report.auto["candidates"]
    ]
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--quantize", "int8"], "--auto chooses the compression itself"),
        (["--objective", "speed"], "objective 'speed'"),
        (["--auto-levels", "int4"], "unknown level 'int4'"),
        (["--budget", "-1"], "--budget must be >= 0"),
    ],
)
def test_bad_auto_options_exit_2_and_write_nothing(tmp_path, capsys, extra, needle):
    out = tmp_path / "m.onnx"
    rc = main(["optimize", MODEL, "-o", str(out), "--auto", "--calib", CALIB, "--check-data", EVAL, *extra])
    assert rc == 2 and needle in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_auto_without_eval_data_is_a_usage_error(tmp_path, capsys):
    assert main(["optimize", MODEL, "-o", str(tmp_path / "m.onnx"), "--auto", "--calib", CALIB]) == 2
    assert "--check-data" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- the arithmetic
def test_levels_parse_and_order_by_size():
    names = [lv.name for lv in parse_levels("share2,int8,prune0.5+share4,share4")]
    assert names == ["int8", "share4", "prune0.5+share4", "share2"]
    for bad in ("int4", "share9", "prune1.5", "int8,int8", ""):
        with pytest.raises(ValueError):
            parse_levels(bad)


def test_level_size_estimate_counts_the_channel_scales_and_stacked_tables():
    import onnx

    from onnxslim.auto.levels import weight_layers

    share4, stacked = parse_levels("share4")[0], parse_levels("share4+int8")[0]
    n, rows = 64 * 128, 64
    assert share4.bytes(n, rows) == n * 4 / 8 + 4 * 16 + 4 * rows  # codes, fp32 codebook, fp32 scale a row
    assert stacked.bytes(n, rows) == n * 4 / 8 + rows * 16 + 4 * rows  # codes, a row's int8 table and scale
    conv = onnx.helper.make_node("Conv", ["x", "w"], ["y"], name="c")
    mm = onnx.helper.make_node("MatMul", ["y", "m"], ["z"], name="m")
    g = onnx.helper.make_graph(
        [conv, mm],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
        [onnx.helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, None)],
        [
            onnx.numpy_helper.from_array(np.zeros((8, 3, 3, 3), np.float32), "w"),
            onnx.numpy_helper.from_array(np.zeros((27, 5), np.float32), "m"),
        ],
    )
    assert [(x.name, x.rows) for x in weight_layers(onnx.helper.make_model(g), 1)] == [("c", 8), ("m", 5)]


def test_greedy_path_moves_the_cheapest_loss_per_byte_first_and_skips_unavailable_levels():
    losses = {"a": {"x": 0.01, "y": 0.02}, "b": {"x": 0.001, "y": math.inf}}
    gains = {"a": {"x": 10.0, "y": 20.0}, "b": {"x": 10.0, "y": 30.0}}
    path = greedy_path(losses, gains, ["x", "y"])
    assert path[0] == {} and path[1] == {"b": "x"}  # 1e-4 per byte beats 1e-3
    assert path[-1] == {"a": "y", "b": "x"}  # b never takes its unavailable level
    assert checkpoints([0.0, 0.001, 0.011, 0.031], 0.01) == [1, 2, 3]


def test_pareto_front_and_objective():
    assert pareto_front([(1.0, 0.5), (2.0, 0.1), (3.0, 0.2), (0.5, 0.9)]) == [0, 1, 3]
    mix = Objective("size:0.5,latency:0.5")
    assert mix.needs_latency and mix.value(0.2, 1.0) == pytest.approx(0.6)
    assert Objective("size").value(0.3, None) == 0.3
    with pytest.raises(ValueError):
        Objective("latency:-1")


def test_task_metric_agreement_without_labels(tmp_path):
    from onnxslim.auto.evaluate import TaskMetric

    feeds = [{"input": s.feeds["input"]} for s in load_feeds(EVAL).samples()][:3]
    for i, f in enumerate(feeds):
        np.savez(tmp_path / f"{i}.npz", **f)
    metric = TaskMetric(MODEL, str(tmp_path))
    assert metric.kind == "agreement" and metric.base_value == 1.0
    same = metric.measure(MODEL)
    assert same["drop"] == pytest.approx(0.0, abs=1e-6)


def test_distillation_lowers_the_drop_of_the_same_candidates(tmp_path):
    kwargs = dict(calibration=CALIB, eval_data=EVAL, min_weights=256, levels="share2", executor="serial")
    kwargs.update(latency=False, plots=False, refine_rounds=0)
    plain = auto_compress(MODEL, tmp_path / "a.onnx", **kwargs).report.auto
    distilled = auto_compress(MODEL, tmp_path / "b.onnx", distill=True, **kwargs).report.auto
    every = {c["label"]: c for c in plain["candidates"]}
    both = [(every[c["label"]], c) for c in distilled["candidates"] if c["label"] == "all share2"]
    assert both, "the every-layer-at-2-bits candidate is measured in both searches"
    p, d = both[0]
    assert p["config"] == d["config"]
    assert d["drop"] < p["drop"]  # 2-bit codebooks refit to the teacher's outputs lose less accuracy
