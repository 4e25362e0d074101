"""collect_statistics: exact reductions vs numpy, ragged samples, If/Loop/Scan bodies, range methods,
save/load, data sources, and flat memory in the number of samples."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim.calibration import Statistics, TensorStats, collect_statistics
from onnxslim.errors import BadInputError, UsageError

from _graphs import non_finite_inside

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"


def _npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _reference_activations(model: onnx.ModelProto, feeds: list[dict], names: list[str]) -> list[dict]:
    """Every requested main-graph activation of every feed, from a plain ORT run (optimizations off)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inferred = onnx.shape_inference.infer_shapes(m)
    vis = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(vis[n] for n in names if n not in have)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    out = []
    for f in feeds:
        f = {k: v for k, v in f.items() if not k.startswith("__")}
        out.append(dict(zip(names, sess.run(names, f))))
    return out


def _identity_model() -> onnx.ModelProto:
    g = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "ident",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_minmax_and_per_channel_equal_numpy_reductions():
    path = SAMPLES / "cnn_digits" / "model.onnx"
    model = onnx.load(path)
    feeds = [_npz(f) for f in sorted((SAMPLES / "cnn_digits" / "calib").glob("*.npz"))[:6]]
    names = [n.output[0] for n in model.graph.node if n.op_type in ("Conv", "Relu", "Add", "Gemm")]
    convs = {n.output[0]: 1 for n in model.graph.node if n.op_type == "Conv"}
    stats = collect_statistics(path, feeds, names, per_channel=convs, bins=256)
    ref = _reference_activations(model, feeds, names)
    assert stats.meta["samples"] == 6
    for name in names:
        values = [r[name] for r in ref]
        s = stats[name]
        assert s.count == sum(v.size for v in values)
        assert s.min == min(float(v.min()) for v in values)
        assert s.max == max(float(v.max()) for v in values)
        assert int(s.hist.sum()) == s.count and len(s.hist_edges) == 257
        if name in convs:
            assert s.channel_axis == 1
            np.testing.assert_array_equal(s.channel_min, np.min([v.min(axis=(0, 2, 3)) for v in values], axis=0))
            np.testing.assert_array_equal(s.channel_max, np.max([v.max(axis=(0, 2, 3)) for v in values], axis=0))
        else:
            assert s.channel_min is None


def test_samples_of_different_shapes():
    path = SAMPLES / "transformer_text" / "model.onnx"
    model = onnx.load(path)
    files = sorted((SAMPLES / "transformer_text" / "eval").glob("*.npz"))[:4]
    feeds = [_npz(f) for f in files]
    assert len({f["input_ids"].shape for f in feeds}) > 1  # really ragged
    names = [n.output[0] for n in model.graph.node if n.op_type in ("MatMul", "Softmax", "Erf")][:12]
    stats = collect_statistics(
        path, SAMPLES / "transformer_text" / "eval", names, per_channel={names[0]: -1}, max_samples=4
    )
    ref = _reference_activations(model, feeds, names)
    for name in names:
        vals = [r[name] for r in ref]
        assert stats[name].count == sum(v.size for v in vals)
        assert stats[name].min == min(float(v.min()) for v in vals)
        assert stats[name].max == max(float(v.max()) for v in vals)
        lo, hi = stats[name].range("percentile")
        assert stats[name].min <= lo <= hi <= stats[name].max
    last = [v[names[0]].reshape(-1, v[names[0]].shape[-1]) for v in ref]
    np.testing.assert_array_equal(stats[names[0]].channel_max, np.max([x.max(axis=0) for x in last], axis=0))


# -- If / Loop --------------------------------------------------------------------------------------------


def _wine():
    model = onnx.load(SAMPLES / "wine_ifloop" / "model.onnx")
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    consts = {}
    for node in model.graph.node:
        if node.op_type == "Constant":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                for sub in a.g.node:
                    if sub.op_type == "Constant":
                        consts[sub.output[0]] = numpy_helper.to_array(sub.attribute[0].t)
    return model, init, consts


def _wine_reference(x: np.ndarray, init: dict, consts: dict) -> tuple[bool, dict[str, np.ndarray]]:
    """The If/Loop computation in numpy: which branch runs, and the subgraph tensors it computes."""
    outside = bool(((x < init["clip_lo"]) | (x > init["clip_hi"])).any())
    out: dict[str, np.ndarray] = {}
    if outside:
        z = (np.maximum(np.minimum(x, init["clip_hi"]), init["clip_lo"]) - init["norm_mean"]) / init["norm_std"]
        out["then_z"] = z
        out["then_a1"] = z @ consts["then_W1"] + consts["then_b1"]
        h = np.maximum(out["then_a1"], 0)
    else:
        z = (x - init["norm_mean"]) / init["norm_std"]
        out["else_mm"] = z @ consts["else_W1"]
        h = np.maximum(out["else_mm"] + consts["else_b1"], 0)
    rs = []
    for i in range(int(consts["trip_count"])):
        r = np.maximum(h @ init["res_W"][i] + init["res_b"][i], 0)
        rs.append(r)
        h = h + r
    out["body_r"] = np.stack(rs)
    return outside, out


@pytest.mark.parametrize("files,taken", [((0, 1), "else"), ((2, 3), "then")])
def test_if_and_loop_tensors_come_only_from_the_branch_that_ran(files, taken):
    model, init, consts = _wine()
    eval_files = sorted((SAMPLES / "wine_ifloop" / "eval").glob("*.npz"))
    feeds = [_npz(eval_files[i]) for i in files]
    names = ["then_z", "then_a1", "else_mm", "body_r"]
    stats = collect_statistics(model, feeds, names, per_channel={"body_r": 1, "then_a1": 1, "else_mm": 1})
    refs = [_wine_reference(f["input"], init, consts) for f in feeds]
    assert all(outside == (taken == "then") for outside, _ in refs)  # the feeds really take one branch
    ran = ["then_z", "then_a1"] if taken == "then" else ["else_mm"]
    for name in names:
        s = stats[name]
        if name not in ran and name != "body_r":
            assert s.count == 0 and s.hist is None and s.channel_min is None
            with pytest.raises(BadInputError, match="never ran"):
                s.range()
            continue
        vals = [r[name] for _, r in refs]
        assert s.count == sum(v.size for v in vals)
        np.testing.assert_allclose(
            [s.min, s.max], [min(v.min() for v in vals), max(v.max() for v in vals)], rtol=1e-5, atol=1e-5
        )
        if name != "then_z":
            # body_r is stacked over iterations in the reference too: channel = last axis of one iteration.
            cmax = np.max([v.reshape(-1, v.shape[-1]).max(axis=0) for v in vals], axis=0)
            np.testing.assert_allclose(s.channel_max, cmax, rtol=1e-5, atol=1e-5)
    assert stats["body_r"].samples == 2


def _scan_in_loop_model() -> onnx.ModelProto:
    """Loop (2 iterations) whose body holds an If (always then) and a Scan (running sum over rows); the Loop
    node leaves its trailing scan output unnamed, so exposing more outputs must pad."""
    then_g = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["doubled"])],
        "then",
        [],
        [helper.make_tensor_value_info("doubled", TensorProto.FLOAT, None)],
    )
    else_g = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["negated"])],
        "else",
        [],
        [helper.make_tensor_value_info("negated", TensorProto.FLOAT, None)],
    )
    scan_body = helper.make_graph(
        [
            helper.make_node("Add", ["acc_in", "row"], ["acc_out"]),
            helper.make_node("Mul", ["acc_out", "it_f"], ["scaled"]),
        ],
        "scan_body",
        [
            helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [3]),
            helper.make_tensor_value_info("row", TensorProto.FLOAT, [3]),
        ],
        [
            helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [3]),
            helper.make_tensor_value_info("scaled", TensorProto.FLOAT, [3]),
        ],
    )
    body = helper.make_graph(
        [
            helper.make_node("Cast", ["i"], ["it_f"], to=TensorProto.FLOAT),
            helper.make_node("If", ["yes"], ["branch_out"], then_branch=then_g, else_branch=else_g),
            helper.make_node(
                "Scan", ["zeros3", "branch_out"], ["acc_final", "scaled_all"], body=scan_body, num_scan_inputs=1
            ),
            helper.make_node("Identity", ["c_in"], ["c_out"]),
            helper.make_node("Add", ["s_in", "acc_final"], ["s_out"]),
        ],
        "loop_body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("s_in", TensorProto.FLOAT, [3]),
        ],
        [
            helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("s_out", TensorProto.FLOAT, [3]),
            helper.make_tensor_value_info("acc_final", TensorProto.FLOAT, [3]),
        ],
    )  # a scan output the Loop node omits
    g = helper.make_graph(
        [helper.make_node("Loop", ["n", "", "zeros3"], ["s"], body=body)],
        "nested",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 3])],
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, [3])],
        [
            numpy_helper.from_array(np.array(2, np.int64), "n"),
            numpy_helper.from_array(np.array(True), "yes"),
            numpy_helper.from_array(np.float32(2.0), "two"),
            numpy_helper.from_array(np.zeros(3, np.float32), "zeros3"),
        ],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    return m


def test_scan_and_if_nested_in_loop():
    m = _scan_in_loop_model()
    x = np.arange(12, dtype=np.float32).reshape(4, 3) - 5
    stats = collect_statistics(m, [{"x": x}], ["scaled", "doubled", "negated", "acc_out"], per_channel={"scaled": 0})
    acc = np.cumsum(2 * x, axis=0)
    scaled = np.stack([acc * i for i in range(2)])  # (iterations, rows, 3)
    assert stats["scaled"].count == scaled.size
    assert (stats["scaled"].min, stats["scaled"].max) == (scaled.min(), scaled.max())
    np.testing.assert_array_equal(stats["scaled"].channel_max, scaled.max(axis=(0, 1)))
    assert (stats["doubled"].count, stats["doubled"].min, stats["doubled"].max) == (24, -10.0, 12.0)
    assert stats["negated"].count == 0
    assert (stats["acc_out"].min, stats["acc_out"].max) == (acc.min(), acc.max())


def _growing_loop_model() -> onnx.ModelProto:
    """Loop (3 iterations) whose carried x grows by one row per iteration; an If inside picks then on iter 1."""
    then_g = helper.make_graph(
        [helper.make_node("Mul", ["x_in", "two"], ["dbl"])],
        "then",
        [],
        [helper.make_tensor_value_info("dbl", TensorProto.FLOAT, [None, 3])],
    )
    else_g = helper.make_graph(
        [helper.make_node("Neg", ["x_in"], ["neg"])],
        "else",
        [],
        [helper.make_tensor_value_info("neg", TensorProto.FLOAT, [None, 3])],
    )
    body = helper.make_graph(
        [
            helper.make_node("Slice", ["x_in", "s0", "s1", "s0"], ["first"]),
            helper.make_node("Concat", ["x_in", "first"], ["grown"], axis=0),
            helper.make_node("Relu", ["grown"], ["x_out"]),
            helper.make_node("Equal", ["i", "one"], ["is_one"]),
            helper.make_node("If", ["is_one"], ["branch"], then_branch=then_g, else_branch=else_g),
            helper.make_node("Identity", ["c"], ["c_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_in", TensorProto.FLOAT, [None, 3]),
        ],
        [
            helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_out", TensorProto.FLOAT, [None, 3]),
        ],
        [
            numpy_helper.from_array(np.array([0], np.int64), "s0"),
            numpy_helper.from_array(np.array([1], np.int64), "s1"),
            numpy_helper.from_array(np.array(1, np.int64), "one"),
            numpy_helper.from_array(np.float32(2.0), "two"),
        ],
    )
    g = helper.make_graph(
        [helper.make_node("Loop", ["n", "", "x"], ["y"], body=body)],
        "growing",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])],
        [numpy_helper.from_array(np.array(3, np.int64), "n")],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    return m


def test_loop_tensors_that_change_shape_fall_back_to_flattened_carries():
    x = np.array([[1, -2, 3], [-4, 5, -6]], np.float32)
    grown, dbl, neg, cur = [], [], [], x
    for i in range(3):
        (dbl if i == 1 else neg).append(2 * cur if i == 1 else -cur)
        g = np.concatenate([cur, cur[:1]])
        grown.append(g)
        cur = np.maximum(g, 0)
    stats = collect_statistics(_growing_loop_model(), [{"x": x}, {"x": x}], ["grown", "dbl", "neg", "x"])
    assert stats.meta["loops_flattened"]
    for name, ref in (("grown", grown), ("dbl", dbl), ("neg", neg), ("x", [x])):
        flat = np.concatenate([r.ravel() for r in ref])
        s = stats[name]
        assert (s.count, s.min, s.max) == (2 * flat.size, flat.min(), flat.max()), name
    with pytest.raises(BadInputError, match="per-channel"):
        collect_statistics(_growing_loop_model(), [{"x": x}], ["grown"], per_channel={"grown": 1})


# -- range methods ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def outlier_stats() -> TensorStats:
    """2M standard-normal values in 20 samples, plus 3 huge outliers."""
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal(100_000).astype(np.float32)} for _ in range(20)]
    feeds[3]["x"][5], feeds[7]["x"][9], feeds[11]["x"][1] = 50.0, 48.0, -45.0
    return collect_statistics(_identity_model(), feeds, ["y"])["y"]


def test_range_methods_on_gaussian_with_outliers(outlier_stats):
    s = outlier_stats
    assert s.range("minmax") == (-45.0, 50.0)
    for method in ("percentile", "entropy", "mse"):
        lo, hi = s.range(method)
        assert s.min <= lo < 0 < hi <= s.max, method
        assert hi < 15 and lo > -15, (method, lo, hi)  # outliers clipped
        assert hi > 2.5 and lo < -2.5, (method, lo, hi)  # the Gaussian body kept
    lo, hi = s.range("percentile", percentile=99.9)
    assert lo == pytest.approx(-3.29, abs=0.1) and hi == pytest.approx(3.29, abs=0.1)  # N(0,1) quantiles
    lo, hi = s.range("percentile", percentile=99.9, symmetric=True)
    assert -lo == hi == pytest.approx(3.29, abs=0.1)
    with pytest.raises(UsageError, match="unknown range method"):
        s.range("max")


def test_mse_keeps_full_range_without_outliers_and_ranges_need_histograms():
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.uniform(0, 6, 50_000).astype(np.float32)} for _ in range(4)]
    s = collect_statistics(_identity_model(), feeds, ["y"])["y"]
    lo, hi = s.range("mse")
    assert lo == s.min and hi > 0.97 * s.max  # uniform data: clipping only hurts
    plain = collect_statistics(_identity_model(), feeds, ["y"], histograms=False)["y"]
    assert plain.hist is None and plain.range() == s.range()
    with pytest.raises(UsageError, match="histograms"):
        plain.range("entropy")


def _div_model() -> onnx.ModelProto:
    """y = x / d: non-finite activations from finite data (``_graphs.non_finite_inside``)."""
    g = helper.make_graph(
        [helper.make_node("Div", ["x", "d"], ["y"])],
        "div",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("x", "d")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_streaming_histogram_is_exact_on_its_final_grid():
    rng = np.random.default_rng(2)
    feeds = [
        {"x": (rng.standard_normal(997) * scale + shift).astype(np.float32)}
        for scale, shift in zip(rng.uniform(0.1, 10, 25), rng.uniform(-30, 30, 25))
    ]
    feeds.append({"x": np.array([np.nan, np.inf, 1.0], np.float32)})  # non-finite values are left out
    s = collect_statistics(_div_model(), non_finite_inside(feeds), ["y"], bins=64)["y"]
    values = np.concatenate([f["x"] for f in feeds]).astype(np.float64)
    values = values[np.isfinite(values)]
    assert s.count == values.size == s.hist.sum()
    assert (s.min, s.max) == (values.min(), values.max())
    assert s.hist_edges[0] <= s.min and s.hist_edges[-1] >= s.max
    assert (s.max - s.min) / (s.hist_edges[-1] - s.hist_edges[0]) > 0.25  # resolution kept
    ref, _ = np.histogram(values, bins=s.hist_edges)
    assert np.abs(ref - s.hist).sum() <= 2  # values exactly on an edge may round into the neighbour


# -- persistence, sources, progress -------------------------------------------------------------------------


def test_save_load_round_trip_is_exact(tmp_path, outlier_stats):
    model, _, _ = _wine()
    feeds = [_npz(f) for f in sorted((SAMPLES / "wine_ifloop" / "eval").glob("*.npz"))[:2]]
    stats = collect_statistics(model, feeds, ["else_mm", "then_a1", "body_r", "h0"], per_channel={"h0": 1})
    stats = Statistics({**stats, "y": outlier_stats}, stats.meta)
    stats.save(tmp_path / "stats.json")
    back = Statistics.load(tmp_path / "stats.json")
    assert back == stats and back.meta == stats.meta and list(back) == list(stats)
    for name in stats:
        a, b = stats[name], back[name]
        assert (a.count, a.min, a.max) == (b.count, b.min, b.max)
        for field in ("channel_min", "channel_max", "hist", "hist_edges"):
            x, y = getattr(a, field), getattr(b, field)
            assert (x is None and y is None) or (x.dtype == y.dtype and np.array_equal(x, y)), field
        if a.count:
            for method in ("minmax", "percentile", "entropy", "mse"):
                assert a.range(method) == b.range(method)
    assert back["then_a1"].count == 0
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(BadInputError, match="not an onnxslim statistics file"):
        Statistics.load(tmp_path / "bad.json")


def test_non_finite_values_are_left_out_and_survive_save_load(tmp_path):
    x = np.array([[1, np.nan, np.inf], [-2, 3, np.nan]], np.float32)  # channel 2 never has a finite value
    stats = collect_statistics(_div_model(), non_finite_inside([{"x": x}]), ["y"], per_channel={"y": 1})
    s = stats["y"]
    assert (s.count, s.min, s.max, int(s.hist.sum())) == (3, -2.0, 3.0, 3)
    np.testing.assert_array_equal(s.channel_min, [-2, 3, np.inf])
    np.testing.assert_array_equal(s.channel_max, [1, 3, -np.inf])
    stats.save(tmp_path / "s.json")
    assert Statistics.load(tmp_path / "s.json") == stats


def test_every_data_source_gives_the_same_statistics(tmp_path):
    path = SAMPLES / "wine_ifloop" / "model.onnx"
    calib = SAMPLES / "wine_ifloop" / "calib"
    files = sorted(calib.glob("*.npz"))[:5]
    for f in files:
        (tmp_path / f.name).write_bytes(f.read_bytes())
    feeds = [_npz(f) for f in files]
    (tmp_path / "data.py").write_text(
        textwrap.dedent(f"""
        import numpy as np, glob
        def feeds():
            for f in sorted(glob.glob({str(tmp_path)!r} + '/*.npz')):
                yield dict(np.load(f))
    """)
    )

    class Reader:
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    calls: list = []
    names = ["h0", "body_r", "logits"]
    base = collect_statistics(path, tmp_path, names, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(i, 5) for i in range(1, 6)]
    for source in (feeds, iter(feeds), Reader(), f"{tmp_path / 'data.py'}:feeds"):
        assert dict(collect_statistics(path, source, names)) == dict(base)  # meta["data"] names the source
    one = collect_statistics(path, files[0], names)
    assert one.meta["samples"] == 1
    assert dict(one) == dict(collect_statistics(path, tmp_path, names, max_samples=1))


def test_one_shot_sources_are_streamed_not_kept():
    seen: list[int] = []

    def gen():
        for i in range(6):
            assert len(seen) == i  # sample i is asked for only after sample i-1 was reduced
            yield {"x": np.full(4, float(i), np.float32)}

    stats = collect_statistics(_identity_model(), gen(), ["y"], progress=lambda d, t: seen.append(d))
    assert (stats["y"].count, stats["y"].min, stats["y"].max) == (24, 0.0, 5.0)


def test_cache_is_reused_only_for_the_same_request(tmp_path):
    path = SAMPLES / "wine_ifloop" / "model.onnx"
    calib = SAMPLES / "wine_ifloop" / "calib"
    cache = tmp_path / "stats.json"
    calls: list = []
    first = collect_statistics(path, calib, ["h0", "body_r"], per_channel={"h0": 1}, cache=cache, max_samples=4)
    assert cache.exists() and first.meta["samples"] == 4
    again = collect_statistics(
        path,
        calib,
        ["body_r", "h0"],
        per_channel={"h0": 1},
        cache=cache,
        max_samples=4,
        progress=lambda d, t: calls.append(d),
    )
    assert calls == [] and dict(again) == dict(first)  # served from the cache
    subset = collect_statistics(
        path, calib, ["h0"], per_channel={"h0": 1}, cache=cache, max_samples=4, progress=lambda d, t: calls.append(d)
    )
    assert calls == [] and list(subset) == ["h0"]
    for changed in ({"bins": 512}, {"max_samples": 3}, {"per_channel": {}}):
        kwargs = {"per_channel": {"h0": 1}, "max_samples": 4, **changed}
        calls.clear()
        collect_statistics(path, calib, ["h0"], cache=cache, progress=lambda d, t: calls.append(d), **kwargs)
        assert calls, changed  # recollected


def test_bad_requests_say_what_to_fix():
    m = _identity_model()
    feeds = [{"x": np.ones(3, np.float32)}]
    with pytest.raises(BadInputError, match="not in the model"):
        collect_statistics(m, feeds, ["nope"])
    with pytest.raises(UsageError, match="not requested"):
        collect_statistics(m, feeds, ["y"], per_channel={"x": 0})
    with pytest.raises(BadInputError, match="out of range"):
        collect_statistics(m, feeds, ["y"], per_channel={"y": 2})
    with pytest.raises(BadInputError, match="no feed dicts"):
        collect_statistics(m, [], ["y"])


# -- memory ----------------------------------------------------------------------------------------------

_MEMORY_SCRIPT = """
import resource, sys
import numpy as np
from onnx import helper, TensorProto
from onnxslim.calibration import collect_statistics
from onnxslim.data import FeedData
n = int(sys.argv[1])
shape = helper.make_tensor("shape", TensorProto.INT64, [2], [256, 1024])
g = helper.make_graph(
    [helper.make_node("Expand", ["x", "shape"], ["big"]), helper.make_node("Relu", ["big"], ["r"]),
     helper.make_node("ReduceMean", ["r"], ["y"], keepdims=0)],
    "mem", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1024])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])], [shape])
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
def gen():  # samples are made on the fly, so only collect_statistics could keep them
    rng = np.random.default_rng(0)
    for i in range(n):
        yield {"x": rng.standard_normal((1, 1024)).astype(np.float32) * (1 + i % 7)}, f"s{i}"
st = collect_statistics(m, FeedData(gen, "synthetic", n), ["r"], per_channel={"r": 1})
assert st["r"].count == n * 256 * 1024 and st["r"].hist.sum() == st["r"].count
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux
"""


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss units differ off Linux")
def test_peak_memory_does_not_grow_with_sample_count():
    """A 256K-float (1 MB) activation per sample: keeping activations would add ~0.5 GB at 512 samples."""

    def peak_kib(n: int) -> int:
        out = subprocess.run(
            [sys.executable, "-c", _MEMORY_SCRIPT, str(n)], capture_output=True, text=True, check=True, cwd=ROOT
        )
        return int(out.stdout.strip().splitlines()[-1])

    small, large = peak_kib(16), peak_kib(512)
    assert large - small < 25 * 1024, (small, large)


# -- models with external data -----------------------------------------------------------------------------
def test_external_data_models_are_read_by_onnxruntime_from_disk(tmp_path, monkeypatch):
    """The weights of a model with external data are handed to onnxruntime as files (hard links in a temporary
    folder, or memory maps where links fail), never loaded into Python; the statistics are the same."""
    src = SAMPLES / "cnn_digits" / "model.onnx"
    inline = onnx.load(src)
    ext_dir = tmp_path / "m"
    ext_dir.mkdir()
    onnx.save(
        onnx.load(src), str(ext_dir / "model.onnx"), save_as_external_data=True, location="w.bin", size_threshold=0
    )
    feeds = [_npz(f) for f in sorted((SAMPLES / "cnn_digits" / "calib").glob("*.npz"))[:4]]
    names = [n.output[0] for n in inline.graph.node if n.op_type == "Conv"]
    ref = collect_statistics(inline, feeds, names)
    from_path = collect_statistics(ext_dir / "model.onnx", feeds, names)
    proto = onnx.load(str(ext_dir / "model.onnx"), load_external_data=False)
    assert any(t.external_data for t in proto.graph.initializer)
    from_proto = collect_statistics(proto, feeds, names, base_dir=ext_dir)
    import onnxslim.calibration as cal

    def no_links(*a, **k):
        raise OSError("cross-device link")

    monkeypatch.setattr(cal.os, "link", no_links)
    mapped = collect_statistics(proto, feeds, names, base_dir=ext_dir)
    for got in (from_path, from_proto, mapped):
        assert {n: (got[n].min, got[n].max, got[n].count) for n in names} == {
            n: (ref[n].min, ref[n].max, ref[n].count) for n in names
        }
    (ext_dir / "w.bin").unlink()
    with pytest.raises(BadInputError, match="w.bin"):
        collect_statistics(proto, feeds, names, base_dir=ext_dir)


def test_model_onnxruntime_cannot_load_gets_a_calibration_error_that_says_so():
    # tf2onnx has written Gelu as an 'Erfc' node, which is not an ONNX op: calibration must name the cause.
    g = helper.make_graph(
        [helper.make_node("Erfc", ["x"], ["e"]), helper.make_node("Relu", ["e"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(BadInputError, match="calibration runs the model in onnxruntime.*Erfc"):
        collect_statistics(m, [{"x": np.ones((2, 4), np.float32)}], ["e"])
