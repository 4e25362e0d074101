"""prune_by_magnitude: magnitude / Wanda / SparseGPT zeroing, unstructured and N:M, on tiny graphs and trained models."""

from __future__ import annotations

import math
import re

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxslim.errors import UsageError
from onnxslim.passes.prune._sparsify import nm_mask, sparsegpt
from onnxslim.passes.prune.prune_by_magnitude import PruneByMagnitude
from onnxslim.pipeline import optimize
from onnxslim.testing import check_pass_contract, run_model

from _fusion_testlib import model
from conftest import SAMPLES, eval_feeds

LOOSE = {"keep_first_last": False, "min_weights": 0}


def _weights(m: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


def _mlp(rng, k=32, n=24, gemm=False):
    w1 = rng.standard_normal((k, n)).astype(np.float32)
    w2 = rng.standard_normal((n, 8)).astype(np.float32)
    layer = (
        helper.make_node("Gemm", ["x", "W1"], ["h"], transB=0)
        if gemm
        else helper.make_node("MatMul", ["x", "W1"], ["h"])
    )
    nodes = [layer, helper.make_node("Relu", ["h"], ["r"]), helper.make_node("MatMul", ["r", "W2"], ["y"])]
    inits = [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")]
    return model(nodes, [("x", [4, k])], [("y", [4, 8])], inits)


def _feeds(shape, n=6, seed=1, scale=None):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.standard_normal(shape).astype(np.float32)
        if scale is not None:
            x = x * scale
        out.append({"x": x.astype(np.float32)})
    return out


def _run(m, calibration=None, **options):
    out, report = optimize(
        m, [PruneByMagnitude(**options)], calibration=calibration, fixed_point=False, on_pass_error="raise"
    )
    onnx.checker.check_model(out, full_check=True)
    return out, report.passes[0]


def test_magnitude_zeroes_exactly_the_smallest_weights():
    m = _mlp(np.random.default_rng(0))
    w = _weights(m)["W1"]
    out, record = _run(m, sparsity=0.3, importance="magnitude", reconstruct="none", **LOOSE)
    got = _weights(out)["W1"]
    k = math.ceil(0.3 * w.size)
    expect = w.copy().reshape(-1)
    expect[np.argsort(np.abs(w).reshape(-1), kind="stable")[:k]] = 0
    np.testing.assert_array_equal(got, expect.reshape(w.shape))
    assert np.count_nonzero(got == 0) >= 0.3 * w.size
    assert record.stats["weights_zeroed"] >= k


def test_wanda_scores_weights_by_input_norm_within_each_output():
    rng = np.random.default_rng(0)
    m = _mlp(rng)
    scale = np.logspace(-2, 1, 32).astype(np.float32)  # input features of very different sizes
    feeds = _feeds([4, 32], scale=scale)
    w = _weights(m)["W1"]
    out, _ = _run(
        m, calibration=feeds, sparsity=0.5, importance="wanda", reconstruct="none", allocation="uniform", **LOOSE
    )
    got = _weights(out)["W1"]
    norm = np.sqrt(sum((f["x"].astype(np.float64) ** 2).sum(axis=0) for f in feeds))
    score = np.abs(w) * norm[:, None]  # W1 is [K, N]: output n is column n
    for n in range(w.shape[1]):
        pruned = np.argsort(score[:, n], kind="stable")[: math.ceil(0.5 * w.shape[0])]
        assert set(np.flatnonzero(got[:, n] == 0)) == set(pruned)
    # by magnitude alone, the small-input rows would have survived as often as the others
    assert np.count_nonzero(got[:8] == 0) > np.count_nonzero(got[-8:] == 0)


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
@pytest.mark.parametrize("with_data", [False, True])
def test_nm_pattern_holds_exactly_along_input_channels(pattern, with_data):
    n, mm = (int(v) for v in pattern.split(":"))
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], pads=[1, 1, 1, 1])]
    m = model(nodes, [("x", [1, 8, 6, 6])], [("y", [1, 16, 6, 6])], [numpy_helper.from_array(w, "W")])
    feeds = _feeds([1, 8, 6, 6]) if with_data else None
    out, record = _run(m, calibration=feeds, pattern=pattern, **LOOSE)
    got = _weights(out)["W"]
    groups = (got != 0).transpose(0, 2, 3, 1).reshape(16, 3, 3, 8 // mm, mm)  # channels in groups of M
    assert (groups.sum(axis=-1) <= n).all()
    assert np.count_nonzero(got == 0) == w.size * (mm - n) // mm
    assert record.layers[0]["method"] == ("sparsegpt" if with_data else "magnitude")


def test_nm_mask_keeps_the_largest_of_each_group():
    score = np.array([[4.0, 1.0, 3.0, 2.0, 0.5, 0.1, 0.9, 0.7]])
    np.testing.assert_array_equal(nm_mask(score, 2, 4), [[False, True, False, True, True, True, False, False]])


def test_sparsegpt_beats_magnitude_on_the_layer_output():
    """The reconstruction's promise on its own terms: lower E||(W - W_s) x||^2 than magnitude, same sparsity."""
    rng = np.random.default_rng(0)
    # redundant features (16 latent factors + noise), as trained layers' inputs are: pruned inputs can be absorbed
    x = rng.standard_normal((512, 16)) @ rng.standard_normal((16, 64)) + 0.05 * rng.standard_normal((512, 64))
    h = x.T @ x / len(x)
    w = rng.standard_normal((32, 64))
    new, mask = sparsegpt(w, h, 0.5)
    assert mask.sum() >= 0.5 * w.size and (new[mask] == 0).all()
    mag = np.where(np.abs(w) <= np.median(np.abs(w)), 0, w)

    def err(v):
        d = v - w
        return float(np.einsum("ij,jk,ik->", d, h, d))

    assert err(new) < 0.5 * err(mag)


def test_trained_model_sparsegpt_keeps_more_decisions_than_magnitude():
    """cnn_digits (trained on sklearn digits), 50% of every conv: SparseGPT from the calibration set keeps the
    held-out decisions better than magnitude pruning, and at least 0.98 of them."""
    path = SAMPLES / "cnn_digits" / "model.onnx"
    feeds = [{k: v for k, v in f.items() if not k.startswith("__")} for f in eval_feeds({"eval": "cnn_digits/eval"})]
    ref = [run_model(str(path), f)[0] for f in feeds]

    def agreement(**opts):
        out, _ = _run(onnx.load(path), calibration=SAMPLES / "cnn_digits" / "calib", sparsity=0.5, **opts)
        got = [run_model(out, f)[0] for f in feeds]
        return float(np.mean(np.concatenate([r.argmax(-1) == g.argmax(-1) for r, g in zip(ref, got)])))

    gpt = agreement()
    mag = agreement(importance="magnitude", reconstruct="none")
    assert gpt >= 0.98 and gpt > mag


def test_sensitivity_allocation_spreads_the_target_by_measured_damage():
    """cnn_digits, 50%: each conv measured alone; the same total zeros spread unevenly, the most damaging layer
    pruned least, and the allocation kept only because it scores at least as well as uniform."""
    out, record = _run(onnx.load(SAMPLES / "cnn_digits" / "model.onnx"), calibration=SAMPLES / "cnn_digits" / "calib",
                       sparsity=0.5, allocation="sensitivity", sensitivity_samples=16)  # fmt: skip
    layers = record.layers
    assert len({d["sparsity"] for d in layers}) > 1
    zeros = sum(d["sparsity"] * d["params"] for d in layers)
    assert zeros >= 0.5 * sum(d["params"] for d in layers) - 1
    worst = max(layers, key=lambda d: d["loss_alone_at_target"])
    assert worst["sparsity"] == min(d["sparsity"] for d in layers)
    note = next(n for n in record.notes if n.startswith("sensitivity allocation"))
    allocated, uniform = (float(v) for v in re.findall(r"allocated ([0-9.]+) vs uniform ([0-9.]+)", note)[0])
    assert ("kept allocated" in note) == (allocated >= uniform)


def test_layer_rules_exclusions_overrides_and_edges():
    rng = np.random.default_rng(0)
    w = {f"W{i}": rng.standard_normal((16, 16)).astype(np.float32) for i in range(4)}
    nodes = [
        helper.make_node("MatMul", ["x" if i == 0 else f"h{i - 1}", f"W{i}"], [f"h{i}"], name=f"mm{i}")
        for i in range(4)
    ]
    m = model(nodes, [("x", [2, 16])], [("h3", [2, 16])], [numpy_helper.from_array(v, k) for k, v in w.items()])
    out, record = _run(m, sparsity=0.5, min_weights=0, layer_sparsity=["mm2=0.25"], exclude_nodes=["re:mm[1]"])
    got = _weights(out)
    assert (got["W0"] == w["W0"]).all() and (got["W3"] == w["W3"]).all()  # first and last stay dense
    assert (got["W1"] == w["W1"]).all()  # excluded
    assert np.count_nonzero(got["W2"] == 0) == 64  # the override
    reasons = {s["node"]: s["reason"] for s in record.skipped}
    assert "keep_first_last" in reasons["mm0"] and "exclude_nodes" in reasons["mm1"]


def test_weights_in_constant_nodes_and_if_branches_are_pruned():
    rng = np.random.default_rng(0)
    wc = rng.standard_normal((16, 16)).astype(np.float32)
    wb = rng.standard_normal((16, 16)).astype(np.float32)
    branch = helper.make_graph(
        [helper.make_node("MatMul", ["h", "WB"], ["yb"])],
        "then",
        [],
        [helper.make_tensor_value_info("yb", onnx.TensorProto.FLOAT, [2, 16])],
        initializer=[numpy_helper.from_array(wb, "WB")],
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["h"], ["ye"])],
        "else",
        [],
        [helper.make_tensor_value_info("ye", onnx.TensorProto.FLOAT, [2, 16])],
    )
    nodes = [
        helper.make_node("Constant", [], ["WC"], value=numpy_helper.from_array(wc, "wc")),
        helper.make_node("MatMul", ["x", "WC"], ["h"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=other),
    ]
    m = model(
        nodes,
        [("x", [2, 16]), helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, [])],
        [("y", [2, 16])],
    )
    out, record = _run(m, sparsity=0.5, importance="magnitude", reconstruct="none", **LOOSE)
    assert record.stats["layers_pruned"] == 2
    x = np.random.default_rng(2).standard_normal((2, 16)).astype(np.float32)
    got = run_model(out, {"x": x, "cond": np.array(True)})[0]
    mask_c = np.abs(wc) > np.sort(np.abs(wc).reshape(-1))[127]
    mask_b = np.abs(wb) > np.sort(np.abs(wb).reshape(-1))[127]
    np.testing.assert_allclose(got, (x @ (wc * mask_c)) @ (wb * mask_b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"sparsity": 1.0}, "sparsity must be in [0, 1)"),
        ({"sparsity": -0.1}, "sparsity must be in [0, 1)"),
        ({"pattern": "4:2"}, "1 <= N < M"),
        ({"pattern": "2-4"}, "N:M such as 2:4"),
        ({"layer_sparsity": ["mm0=1.5"]}, "SPARSITY in [0, 1)"),
        ({"op_types": ["Relu"]}, "not prunable"),
    ],
)
def test_bad_options_are_one_line_usage_errors(options, message):
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")) as e:
        PruneByMagnitude(**options)
    assert "\n" not in str(e.value)


def test_wanda_without_data_says_what_to_give():
    with pytest.raises(UsageError, match="--calib"):
        _run(_mlp(np.random.default_rng(0)), importance="wanda", **LOOSE)


def test_contract_on_a_trained_model():
    check_pass_contract(
        PruneByMagnitude(sparsity=0.5),
        SAMPLES / "cnn_digits" / "model.onnx",
        SAMPLES / "cnn_digits" / "eval",
        calibration=SAMPLES / "cnn_digits" / "calib",
        expect_modified=True,
    )


def test_the_allocation_keeps_layer_sparsity_overrides_as_given():
    out, record = _run(onnx.load(SAMPLES / "cnn_digits" / "model.onnx"), calibration=SAMPLES / "cnn_digits" / "calib",
                       sparsity=0.5, allocation="sensitivity", layer_sparsity=["*block1*=0.3"])  # fmt: skip
    pinned = [d for d in record.layers if "block1" in d["layer"]]
    assert pinned and all(abs(d["sparsity"] - 0.3) < 0.01 for d in pinned)
    assert all("loss_alone_at_target" not in d for d in pinned)


def test_sensitivity_allocation_reads_external_weights_from_another_working_folder(tmp_path, monkeypatch):
    # The probes' sessions are made from bytes; onnxruntime would look for the weights in the working folder.
    from conftest import SAMPLES

    cnn = SAMPLES / "cnn_digits"
    model = onnx.load(str(cnn / "model.onnx"))
    src = tmp_path / "models" / "m.onnx"
    src.parent.mkdir()
    onnx.save_model(model, str(src), save_as_external_data=True, location="m.data", size_threshold=0)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    out, report = optimize(
        str(src), ["prune_by_magnitude:sparsity=0.5"], calibration=str(cnn / "calib"), on_pass_error="raise"
    )
    assert report.passes[0].stats["weights_zeroed"] > 0
    assert any("sensitivity" in n or "allocation" in n for n in report.passes[0].notes)


def test_depthwise_conv_is_kept_by_default_and_pruned_by_wanda_when_asked():
    rng = np.random.default_rng(0)
    c = 8
    wd = rng.standard_normal((c, 1, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "WD"], ["y"], group=c, pads=[1, 1, 1, 1], name="dw")]
    m = model(nodes, [("x", [1, c, 6, 6])], [("y", [1, c, 6, 6])], [numpy_helper.from_array(wd, "WD")])
    out, record = _run(m, sparsity=0.5, **LOOSE)
    np.testing.assert_array_equal(_weights(out)["WD"], wd)
    assert "keep_depthwise" in {s["node"]: s["reason"] for s in record.skipped}["dw"]

    scale = np.linspace(0.1, 3.0, c, dtype=np.float32).reshape(1, c, 1, 1)  # channel norms differ
    feeds = _feeds((1, c, 6, 6), scale=scale)
    out, record = _run(m, calibration=feeds, sparsity=0.5, keep_depthwise=False, allocation="uniform", **LOOSE)
    got = _weights(out)["WD"]
    # each output reads one input channel, so Wanda's |w| * ||x|| ranks weights as |w| within each output
    for k in range(c):
        flat = np.abs(wd[k].reshape(-1))
        zeroed = got[k].reshape(-1) == 0
        assert zeroed.sum() >= 4 and flat[zeroed].max() <= flat[~zeroed].min()
    assert record.stats["layers_pruned"] == 1 and np.count_nonzero(got == 0) >= 0.5 * wd.size


def test_sensitivity_allocation_probes_every_layer_unless_limited():
    m, calib = onnx.load(SAMPLES / "cnn_digits" / "model.onnx"), SAMPLES / "cnn_digits" / "calib"
    counts = {}
    for limit in (0, 2):
        _, record = _run(m, calibration=calib, sparsity=0.5, allocation="sensitivity", sensitivity_layers=limit)
        note = next(n for n in record.notes if n.startswith("sensitivity allocation"))
        counts[limit] = tuple(int(v) for v in re.findall(r"(\d+) of (\d+) layers", note)[0])
    probed, total = counts[0]
    assert probed == total > 2 and counts[2] == (2, total)
    assert PruneByMagnitude.Options().sensitivity_layers == 0  # all, by default
