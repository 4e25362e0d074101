"""share_weights: k-means codebooks, compensated codes and refit from data, packed b-bit storage that decodes exactly."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from onnxslim.bit_packing import pack_codes, packed_nbytes, unpack_codes, word_layout
from onnxslim.cli import main
from onnxslim.errors import UsageError
from onnxslim.passes.share.share_weights import ShareWeights
from onnxslim.pipeline import optimize
from onnxslim.testing import check_pass_contract, run_model

from _fusion_testlib import model
from conftest import SAMPLES

LOOSE = {"keep_first_last": False, "min_weights": 0, "allocation": "uniform"}
CNN = SAMPLES / "cnn_digits" / "model.onnx"


def _mlp(w1, w2, opset=17, batch=8):
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Gemm", ["r", "W2"], ["y"], transB=1),
    ]
    inits = [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")]
    return model(nodes, [("x", [batch, w1.shape[0]])], [("y", [batch, w2.shape[0]])], inits, opset=opset)


def _weights(seed=0, k=64, n=48, o=16):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((k, n)).astype(np.float32), rng.standard_normal((o, n)).astype(np.float32)


def _correlated_feeds(k=64, n=8, batch=8, seed=1):
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) * np.linspace(2.0, 0.1, k)[:, None]  # correlated, uneven input features
    return [{"x": (rng.standard_normal((batch, k)) @ mix).astype(np.float32)} for _ in range(n)]


def _run(m, calibration=None, **options):
    out, report = optimize(
        m, [ShareWeights(**options)], calibration=calibration, fixed_point=False, on_pass_error="raise"
    )
    onnx.checker.check_model(out, full_check=True)
    return out, report.passes[0]


def _inits(m):
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


def _session(m, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL, path=None):
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    if path is not None:
        so.optimized_model_filepath = str(path)
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("bits", range(1, 9))
def test_codes_pack_and_unpack_exactly(bits):
    codes = np.random.default_rng(bits).integers(0, 1 << bits, size=1001)
    words = pack_codes(codes, bits)
    dtype, k = word_layout(bits)
    assert words.dtype == dtype and words.shape == (-(-1001 // k), 1) and words.nbytes == packed_nbytes(1001, bits)
    np.testing.assert_array_equal(unpack_codes(words, bits, 1001), codes)


_GRANULARITY = {
    "tensor": {"channel_scales": False},
    "channel": {"per_channel": True},
    "scaled": {"channel_scales": True},
}


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("granularity", sorted(_GRANULARITY))
def test_at_most_2_to_the_b_values_and_deterministic(bits, granularity):
    w1, w2 = _weights()
    m = _mlp(w1, w2)
    opts = _GRANULARITY[granularity] | {"bits": bits, "decode": "dense"} | LOOSE
    out, record = _run(m, **opts)
    again, _ = _run(m, **opts)
    got = _inits(out)
    for name, axis in (("W1", 1), ("W2", 0)):  # MatMul [in, out], Gemm transB [out, in]
        w = got[name]
        if granularity == "tensor":
            assert len(np.unique(w)) <= 2**bits
        else:
            assert all(len(np.unique(np.take(w, c, axis=axis))) <= 2**bits for c in range(w.shape[axis]))
        if granularity == "scaled" and bits < 8:  # one codebook: each channel's values over its largest
            units = np.unique(np.round(w / np.abs(w).max(axis=1 - axis, keepdims=True), 5))
            assert len(np.unique(w)) > 2**bits and len(units) <= 2 ** (bits + 1)  # +-1 ends, rounding
        np.testing.assert_array_equal(w, _inits(again)[name])
    if granularity == "channel" and bits == 8:  # 48 or 64 weights a row: already at most 256 values each
        assert not record.modified and all("already holds" in s["reason"] for s in record.skipped)
    else:
        assert record.stats["layers_shared"] == 2 and record.modified


@pytest.mark.parametrize("opset", [11, 13, 17, 21])
@pytest.mark.parametrize(
    "bits, granularity",
    [(2, "tensor"), (3, "channel"), (4, "tensor"), (4, "scaled"), (5, "channel"), (3, "scaled"), (7, "tensor")]
    + [(8, "tensor")],
)
def test_packed_form_decodes_exactly_folds_and_shrinks(tmp_path, opset, bits, granularity):
    w1, w2 = _weights()
    m = _mlp(w1, w2, opset)
    opts = _GRANULARITY[granularity] | {"bits": bits} | LOOSE
    per_channel = granularity == "channel"
    dense, _ = _run(m, decode="dense", **opts)
    packed, record = _run(m, **opts)
    ops = {n.op_type for n in packed.graph.node}
    assert ("Cast" in ops) and (bits == 8 or "BitShift" in ops) and "Constant" not in ops
    assert not {"W1", "W2"} & set(_inits(packed))  # the dense weights are gone from the file
    # numpy reference: codebook[unpack(words)] is the shared dense weight, exactly
    inits = _inits(packed)
    for name, shape in (("W1", w1.shape), ("W2", w2.shape)):
        codebook = inits[f"{name}_codebook"]
        n = int(np.prod(shape))
        codes = (
            inits[f"{name}_codes_u8"].astype(np.int64)
            if bits == 8
            else unpack_codes(inits[f"{name}_codes_packed"], bits, n)
        )
        view = (
            codebook[codes]
            if codebook.ndim == 1
            else np.take_along_axis(codebook, codes.reshape(codebook.shape[0], -1), 1)
        )
        order = (1, 0) if name == "W1" else (0, 1)
        moved = [shape[a] for a in order]
        if granularity == "scaled":  # row r (output feature) is scales[r] * codebook[codes_r]
            scales = inits[f"{name}_scales"]
            assert scales.shape == (moved[0], 1) and np.all(scales > 0)
            view = view.reshape(moved[0], -1) * scales
        rebuilt = view.reshape(moved).transpose(np.argsort(order))
        np.testing.assert_array_equal(rebuilt, _inits(dense)[name])
    # onnxruntime: folded at load (the optimized model holds only the layers) and bit-identical outputs
    opt = tmp_path / "opt.onnx"
    _session(packed, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, opt)
    assert {n.op_type for n in onnx.load(str(opt)).graph.node} == {"MatMul", "Relu", "Gemm"}
    feed = _correlated_feeds(n=1)[0]
    ref = run_model(dense, feed)[0]
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        np.testing.assert_array_equal(_session(packed, level).run(None, feed)[0], ref)
    # size: b/32 of the dense bytes plus the codebook
    for layer in record.layers:
        rows = 48 if layer["op"] == "MatMul" else 16  # output features
        book = (2**bits) * 4 * (rows if per_channel else 1) + (4 * rows if granularity == "scaled" else 0)
        assert layer["stored_bytes"] == packed_nbytes(layer["params"], bits) + book
        assert layer["stored_bytes"] <= layer["dense_bytes"] * bits / 32 * 1.07 + book
    assert record.stats["bytes_saved"] == sum(x["dense_bytes"] - x["stored_bytes"] for x in record.layers)
    if bits == 4 and granularity == "tensor":
        assert packed.ByteSize() < 0.25 * m.ByteSize()  # 1/8 + codebooks, plus ~0.7 KB of chain nodes a weight


def test_pruned_zeros_stay_zero_and_take_code_zero():
    w1, w2 = _weights()
    rng = np.random.default_rng(3)
    w1[rng.random(w1.shape) < 0.5] = 0
    out, record = _run(_mlp(w1, w2), calibration=_correlated_feeds(), bits=3, decode="dense", **LOOSE)
    got = _inits(out)["W1"]
    assert np.all(got[w1 == 0] == 0) and 0.0 in np.unique(got)
    facts = {x["layer"] or x["op"]: x for x in record.layers}
    assert facts["MatMul"]["kept_zero"] and not facts["Gemm"]["kept_zero"]
    for bits in (3, 8):
        # Packed, zeros cost one mask bit instead of b: only the codes of non-zero weights are stored.
        dense, _ = _run(_mlp(w1, w2), calibration=_correlated_feeds(), bits=bits, decode="dense", **LOOSE)
        packed, rec = _run(_mlp(w1, w2), calibration=_correlated_feeds(), bits=bits, **LOOSE)
        facts = {x["layer"] or x["op"]: x for x in rec.layers}
        assert facts["MatMul"].get("sparse_codes") and not facts["Gemm"].get("sparse_codes")
        nnz = int(np.count_nonzero(_inits(dense)["W1"]))
        stored = [v for k, v in _inits(packed).items() if k.startswith("W1_codes")]
        assert [a.nbytes for a in stored] == [nnz if bits == 8 else packed_nbytes(nnz, bits)]
        scales = 4 * w1.shape[1]  # one fp32 scale per output feature
        assert facts["MatMul"]["stored_bytes"] - scales < facts["MatMul"]["dense_bytes"] * (bits / 32)  # < b bits
        for f in _correlated_feeds()[:4]:  # the chain rebuilds exactly the shared weights
            assert np.array_equal(run_model(packed, f)[0], run_model(dense, f)[0])


def test_compensated_codes_and_refit_lower_the_output_error():
    """On correlated inputs, GPTQ-style assignment + least-squares centroids beat plain (weighted) k-means on
    the layer's outputs, measured on held-out data through onnxruntime."""
    w1, w2 = _weights()
    m = _mlp(w1, w2)
    feeds = _correlated_feeds(n=24)  # one input distribution: 16 samples to calibrate, 8 held out
    calib, held = feeds[:16], feeds[16:]

    def err(out):
        e = [np.linalg.norm(run_model(out, f)[0] - run_model(m, f)[0]) ** 2 for f in held]
        return float(np.sum(e) / sum(np.linalg.norm(run_model(m, f)[0]) ** 2 for f in held))

    plain, _ = _run(m, calibration=calib, bits=3, assignment="nearest", refit=False, **LOOSE)
    refined, record = _run(m, calibration=calib, bits=3, **LOOSE)
    assert all(x["method"] == "kmeans+scales+compensated+refit" for x in record.layers)
    assert all(x["output_error"] < 0.5 * x["kmeans_output_error"] for x in record.layers)
    assert err(refined) < 0.6 * err(plain)


def test_on_a_trained_model_compensation_and_refits_lower_the_held_out_error():
    """cnn_digits (trained, BatchNorm folded) at 3 bits, logits on the held-out digits against the original:
    plain k-means > compensated codes + refit > the same with channel scales (the default)."""
    feeds = []
    for f in sorted((SAMPLES / "cnn_digits" / "eval").glob("*.npz"))[:8]:
        with np.load(f) as z:
            feeds.append({k: z[k] for k in z.files if not k.startswith("__")})
    ref = [run_model(str(CNN), f)[0] for f in feeds]
    calib = SAMPLES / "cnn_digits" / "calib"
    one = {"bits": 3, "channel_scales": False}
    error = {}
    for name, opts in (
        ("plain", one | {"assignment": "nearest", "refit": False}),
        ("compensated", one),
        ("scaled", {"bits": 3}),
    ):
        out, _ = _run(onnx.load(CNN), calibration=calib, **opts)
        error[name] = sum(float(np.sum((run_model(out, f)[0] - r) ** 2)) for f, r in zip(feeds, ref))
    assert error["scaled"] < error["compensated"] < 0.8 * error["plain"], error


def test_channel_scales_keep_quiet_channels_that_one_codebook_merges():
    """Output channels whose ranges differ 100x (BatchNorm folded into a conv): one codebook over the tensor
    spends its values on the loud channels; one codebook times a scale per channel fits every channel, for 4
    bytes a channel. Measured on held-out data through onnxruntime, per channel."""
    w1, w2 = _weights()
    w1 = w1 * np.logspace(-2, 0, w1.shape[1], dtype=np.float32)[None, :]  # MatMul [in, out]: per output column
    m = _mlp(w1, w2)
    feeds = _correlated_feeds(n=24)
    calib, held = feeds[:16], feeds[16:]
    one, rec_one = _run(m, calibration=calib, bits=3, channel_scales=False, **LOOSE)
    scaled, rec_scaled = _run(m, calibration=calib, bits=3, **LOOSE)
    assert rec_one.stats["layers_shared"] == rec_scaled.stats["layers_shared"] == 2
    x = np.concatenate([f["x"] for f in held])
    h = x @ w1
    worst = {}
    for name, out in (("one", one), ("scaled", scaled)):
        got = x @ _dense_weight(out, "W1", feeds[0])
        worst[name] = float((np.linalg.norm(got - h, axis=0) / np.linalg.norm(h, axis=0)).max())
    assert worst["scaled"] < 0.5 * worst["one"], worst
    (layer,) = [x for x in rec_scaled.layers if x["op"] == "MatMul"]
    assert layer["stored_bytes"] == packed_nbytes(w1.size, 3) + 8 * 4 + 4 * w1.shape[1]  # codes, book, scales


def _dense_weight(m, name, feed):
    """The weight the decoding chain rebuilds, read from onnxruntime."""
    probe = onnx.ModelProto()
    probe.CopyFrom(m)
    probe.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run([name], feed)[0]


def test_constant_nodes_and_if_bodies_are_shared():
    rng = np.random.default_rng(0)
    wc, wb = (rng.standard_normal((16, 16)).astype(np.float32) for _ in range(2))
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
        nodes, [("x", [2, 16]), helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, [])], [("y", [2, 16])]
    )
    dense, _ = _run(m, bits=2, decode="dense", **LOOSE)
    packed, record = _run(m, bits=2, **LOOSE)
    assert record.stats["layers_shared"] == 2
    feed = {"x": rng.standard_normal((2, 16)).astype(np.float32), "cond": np.array(True)}
    np.testing.assert_array_equal(run_model(packed, feed)[0], run_model(dense, feed)[0])
    assert not np.array_equal(run_model(m, feed)[0], run_model(dense, feed)[0])


def test_trained_model_keeps_its_decisions_at_4_bits():
    """cnn_digits with its calibration data, every conv at 4 bits: top-1 agreement with the original on the
    held-out set >= 0.98, and the shared convs take about 1/8 of their bytes."""
    out, record = _run(onnx.load(CNN), calibration=SAMPLES / "cnn_digits" / "calib", bits=4)
    feeds = []
    for f in sorted((SAMPLES / "cnn_digits" / "eval").glob("*.npz")):
        with np.load(f) as z:
            feeds.append({k: z[k] for k in z.files if not k.startswith("__")})
    agree = np.concatenate([run_model(str(CNN), f)[0].argmax(-1) == run_model(out, f)[0].argmax(-1) for f in feeds])
    assert agree.mean() >= 0.98, f"top-1 agreement {agree.mean():.4f}"
    dense = sum(x["dense_bytes"] for x in record.layers)
    assert sum(x["stored_bytes"] for x in record.layers) < 0.16 * dense


def test_contract_on_a_trained_model():
    check_pass_contract(
        ShareWeights(bits=4),
        CNN,
        SAMPLES / "cnn_digits" / "eval",
        calibration=SAMPLES / "cnn_digits" / "calib",
        expect_modified=True,
        metric_floors=ShareWeights.metric_floors,
    )


@pytest.mark.parametrize(
    "options, message",
    [
        ({"bits": 1}, "bits must be in 2..8"),
        ({"bits": 9}, "bits must be in 2..8"),
        ({"layer_bits": ["conv=12"]}, "PATTERN=B"),
        ({"op_types": ["Relu"]}, "cannot be shared"),
    ],
)
def test_bad_options_are_one_line_usage_errors(options, message):
    with pytest.raises(UsageError, match=message.replace(".", r"\.")) as e:
        ShareWeights(**options)
    assert "\n" not in str(e.value)


def test_bad_bits_on_the_command_line_exit_2_with_one_line(capsys, tmp_path):
    out = tmp_path / "o.onnx"
    code = main(["optimize", str(CNN), "-o", str(out), "-p", "share_weights:bits=9"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "bits must be in 2..8" in err, err
    assert not out.exists()


def test_sensitivity_allocation_spends_the_same_bits_where_they_matter(tmp_path):
    """On the trained sample CNN: 3 bits on average, spread by measured damage; verified against uniform."""
    cnn = SAMPLES / "cnn_digits"
    rep = tmp_path / "r.json"
    argv = ["optimize", str(cnn / "model.onnx"), "-o", str(tmp_path / "s.onnx"), "--share", "3"]
    argv += ["--calib", str(cnn / "calib"), "--report", str(rep), "--no-latency", "-q"]
    argv += ["--share-option", "allocation=sensitivity"]
    assert main(argv) == 0
    (p,) = [p for p in json.loads(rep.read_text())["passes"] if p["name"] == "share_weights"]
    (note,) = [n for n in p["notes"] if n.startswith("sensitivity allocation:")]
    allocated, uniform = (float(x) for x in re.findall(r"score allocated ([0-9.]+) vs uniform ([0-9.]+)", note)[0])
    kept = note.rsplit("kept ", 1)[1]
    assert kept == ("allocated" if allocated >= uniform else "uniform")
    bits = {row["layer"]: row["bits"] for row in p["layers"]}
    params = {row["layer"]: row["params"] for row in p["layers"]}
    average = sum(bits[k] * params[k] for k in bits) / sum(params.values())
    assert average <= 3 + 1e-9  # the same index budget as uniform 3 bits
    if kept == "allocated":
        assert len(set(bits.values())) > 1
    # layer_bits is the user's word: a pinned layer keeps its width, the rest are allocated around it.
    pinned = sorted(bits)[0]
    assert main([*argv, "--share-option", f"layer_bits={pinned}=6"]) == 0
    (p,) = [p for p in json.loads(rep.read_text())["passes"] if p["name"] == "share_weights"]
    assert {row["layer"]: row["bits"] for row in p["layers"]}[pinned] == 6
    # uniform (the default): every layer at b
    assert main(argv[:-2]) == 0
    (p,) = [p for p in json.loads(rep.read_text())["passes"] if p["name"] == "share_weights"]
    assert {row["bits"] for row in p["layers"]} == {3}
    assert not any(n.startswith("sensitivity allocation:") for n in p["notes"])


def test_an_accuracy_floor_picks_the_fewest_bits_that_hold_it(tmp_path):
    cnn = SAMPLES / "cnn_digits"
    rep = tmp_path / "r.json"
    average = {}
    for floor in (0.99, 0.999):
        argv = ["optimize", str(cnn / "model.onnx"), "-o", str(tmp_path / "s.onnx"), "--share", "2"]
        argv += ["--share-option", f"min_score={floor}", "--calib", str(cnn / "calib"), "--report", str(rep), "-q"]
        assert main([*argv, "--no-latency"]) == 0
        (p,) = [p for p in json.loads(rep.read_text())["passes"] if p["name"] == "share_weights"]
        (note,) = [n for n in p["notes"] if n.startswith(f"sensitivity allocation to score >= {floor:g}")]
        score = float(re.search(r"measured score ([0-9.]+)", note)[1])
        assert score >= floor and note.endswith("the floor holds")
        rows = p["layers"]
        assert all(2 <= r["bits"] <= 8 for r in rows)
        average[floor] = sum(r["bits"] * r["params"] for r in rows) / sum(r["params"] for r in rows)
    assert average[0.999] > average[0.99]  # a stricter floor costs bits
    assert (
        main(
            ["optimize", str(cnn / "model.onnx"), "-o", str(tmp_path / "x.onnx"), "--share", "4"]
            + ["--share-option", "min_score=1.5"]
        )
        == 2
    )


def test_recurrent_weights_are_shared_and_the_trained_lstm_keeps_its_decisions():
    """gru_digits' LSTM: its input (W [1, 4H, in]) and recurrence (R [1, 4H, H]) weights are shared per gate
    row at 4 bits (at most 2^b values times the row's scale), decoded exactly, and the held-out digits keep
    their top-1 class (>= 0.98; 0.9956 measured); the file falls to about a quarter."""
    gru = SAMPLES / "gru_digits"
    src = onnx.load(gru / "model.onnx")
    out, record = _run(src, calibration=gru / "calib", bits=4, keep_first_last=False)
    lstm = [x for x in record.layers if x["op"] == "LSTM"]
    assert len(lstm) == 2 and record.stats["layers_shared"] == 2
    (node,) = [n for n in src.graph.node if n.op_type == "LSTM"]
    feeds = []
    for f in sorted((gru / "eval").glob("*.npz")):
        with np.load(f) as z:
            feeds.append({k: z[k] for k in z.files if not k.startswith("__")})
    for name in node.input[1:3]:
        w = _dense_weight(out, name, feeds[0]).reshape(-1, _inits(src)[name].shape[-1])
        rows = np.abs(w).max(axis=1, keepdims=True)
        assert max(len(np.unique(np.round(r / s, 5))) for r, s in zip(w, rows)) <= 16  # one codebook x row scale
    ref = ort.InferenceSession(src.SerializeToString(), providers=["CPUExecutionProvider"])
    got = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])
    agree = np.concatenate([ref.run(None, f)[0].argmax(-1) == got.run(None, f)[0].argmax(-1) for f in feeds])
    assert agree.mean() >= 0.98, agree.mean()
    assert out.ByteSize() < 0.3 * src.ByteSize()


def test_a_gru_recurrence_that_reads_r_times_h_is_left_with_the_reason():
    r = np.random.default_rng(0)
    h, i = 32, 16
    nodes = [helper.make_node("GRU", ["x", "W", "R"], ["y"], hidden_size=h)]
    inits = [numpy_helper.from_array(r.standard_normal((1, 3 * h, n)).astype(np.float32), k)
             for k, n in (("W", i), ("R", h))]  # fmt: skip
    m = model(nodes, [("x", [5, 2, i])], [("y", [5, 1, 2, h])], inits)
    out, record = _run(m, bits=4, **LOOSE)
    assert [x["op"] for x in record.layers] == ["GRU"]  # W only
    assert any("linear_before_reset=0" in s["reason"] for s in record.skipped)
