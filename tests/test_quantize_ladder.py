"""quantize_int8_static's precision ladder (int8 -> int16 activations -> weights only -> float) and auto_precision."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim.errors import UsageError
from onnxslim.graph import check_model
from onnxslim.parity_metrics import cosine_similarity
from onnxslim.passes.quantize.quantize_int8_static import QuantizeInt8Static
from onnxslim.pipeline import DEFAULT_PASSES, optimize
from onnxslim.testing import check_pass_contract

from _graphs import stored_weight
from conftest import MODELS, SAMPLES, accuracy, eval_feeds

Q = "quantize_int8_static"
# The tiny test layers are below the default min_macs_for_activation_quantization (they would get weights only).
FULL = {"min_macs_for_activation_quantization": 0}


def _outlier_model(
    opset: int = 17, contrib: bool = False, op: str = "MatMul", outlier: float = 1000.0
) -> onnx.ModelProto:
    """x[1,16] -> mm1 -> h -> mm2 (MatMul or Gemm) -> y. h's channel 0 is ~1000x the others (and mm2 ignores
    it): an 8-bit range for h rounds every other channel to a few levels, so int8 on mm2's input ruins y."""
    r = np.random.default_rng(0)
    w1 = r.standard_normal((16, 16)).astype(np.float32)
    w1[:, 0] *= outlier
    w2 = r.standard_normal((16, 8)).astype(np.float32)
    w2[0, :] = 0.0
    shape = [1, 16]
    if op == "Conv":  # 1x1 convolutions on a [1, 16, 1, 1] input: the same numbers
        w1, w2, shape = w1.T[:, :, None, None].copy(), w2.T[:, :, None, None].copy(), [1, 16, 1, 1]
    nodes = [
        helper.make_node(op if op == "Conv" else "MatMul", ["x", "W1"], ["h"], name="mm1"),
        helper.make_node(op, ["h", "W2"], ["y"], name="mm2"),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8] + shape[2:])],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")],
    )
    ops = [helper.make_opsetid("", opset)] + ([helper.make_opsetid("com.microsoft", 1)] if contrib else [])
    m = helper.make_model(g, opset_imports=ops)
    m.ir_version = 10 if opset >= 21 else 8
    check_model(m, full=True)
    return m


def _feeds(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    r = np.random.default_rng(seed)
    return [{"x": r.standard_normal((1, 16)).astype(np.float32)} for _ in range(n)]


CALIB, EVAL = _feeds(16, 1), _feeds(32, 2)


def _as(m: onnx.ModelProto, feeds):
    """The feeds reshaped to the model's input (the Conv variant takes [1, 16, 1, 1])."""
    rank = len(m.graph.input[0].type.tensor_type.shape.dim)
    return [{"x": f["x"].reshape(f["x"].shape + (1,) * (rank - 2))} for f in feeds]


def _run(m: onnx.ModelProto, feeds, optimized: bool = False, accuracy_level: int | None = None) -> np.ndarray:
    so = ort.SessionOptions()
    if accuracy_level is not None:
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return np.concatenate([s.run(None, f)[0].reshape(-1) for f in _as(m, feeds)])


def _cos(a, b) -> float:
    return float(cosine_similarity(a.astype(np.float64), b.astype(np.float64)))


def _producer(m: onnx.ModelProto, name: str) -> onnx.NodeProto | None:
    return next((n for n in m.graph.node if name in n.output), None)


def _inits(m: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in m.graph.initializer}


def _node(m, name):
    return next(n for n in m.graph.node if n.name == name)


def _quantize(m, **opts):
    out, rep = optimize(m, [QuantizeInt8Static(**FULL, **opts)], calibration=_as(m, CALIB))
    check_model(out, full=True)
    return out, rep.passes[0]


# ------------------------------------------------------------------------------------------ rungs
def test_int8_rung_is_the_default_and_int8_ruins_the_outlier_model():
    m = _outlier_model()
    out, rec = _quantize(m)
    dq = _producer(out, _node(out, "mm2").input[0])
    assert dq.op_type == "DequantizeLinear" and _inits(out)[dq.input[2]].data_type == TensorProto.UINT8
    assert not any(k.startswith("layers_") for k in rec.stats)
    assert _cos(_run(out, EVAL), _run(m, EVAL)) < 0.99  # the naive all-int8 model fails the floor


@pytest.mark.parametrize("opset,contrib,domain", [(21, False, ""), (17, True, "com.microsoft")])
def test_int16_rung_has_16bit_qdq_and_runs_in_onnxruntime(opset, contrib, domain):
    m = _outlier_model(opset, contrib)
    out, rec = _quantize(m, int16_activation_nodes=["mm2"])
    assert rec.stats["layers_int16"] == 1 and rec.stats["activations_int16"] == 1
    mm2 = _node(out, "mm2")
    dq = _producer(out, mm2.input[0])
    q = _producer(out, dq.input[0])
    assert (dq.op_type, q.op_type) == ("DequantizeLinear", "QuantizeLinear") and dq.domain == q.domain == domain
    assert _inits(out)[dq.input[2]].data_type == TensorProto.UINT16
    assert q.input[0] == "h"
    w = _producer(out, mm2.input[1])
    assert w.op_type == "DequantizeLinear" and _inits(out)[w.input[0]].data_type == TensorProto.INT8
    # mm1 keeps its 8-bit input pair; the 8-bit pair on h (no reader left) is gone.
    assert _inits(out)[_producer(out, _node(out, "mm1").input[0]).input[2]].data_type == TensorProto.UINT8
    assert rec.stats["activations_quantized"] == 1
    ref = _run(m, EVAL)
    assert _cos(_run(out, EVAL), ref) > 0.999  # all-int8: < 0.99
    # ORT's default optimizations turn DQ(int8 W) -> MatMul into MatMulNBits, which re-quantizes the 16-bit
    # activation to int8 per block (accuracy level 4); at accuracy level 0 the rung holds there too.
    assert _cos(_run(out, EVAL, optimized=True, accuracy_level=0), ref) > 0.999


def test_int16_rung_in_the_pass_contract_check():
    m = _outlier_model(21)
    check_pass_contract(
        QuantizeInt8Static(**FULL, int16_activation_nodes=["mm2"]),
        m,
        EVAL,
        rtol=0.1,
        atol=2.0,
        calibration=CALIB,
        expect_modified=True,
    )


def test_int16_without_opset21_or_contrib_import_falls_back_to_weight_only():
    out, rec = _quantize(_outlier_model(17), int16_activation_nodes=["mm2"])
    assert "layers_int16" not in rec.stats and rec.stats["layers_weight_only"] == 1
    assert any("opset >= 21" in n for n in rec.notes)
    assert _node(out, "mm2").input[0] == "h"
    assert not any(n.domain for n in out.graph.node)


def test_weight_only_rung_keeps_activation_float_and_weight_int8():
    m = _outlier_model()
    out, rec = _quantize(m, weight_only_nodes=["mm2"])
    mm2 = _node(out, "mm2")
    assert mm2.input[0] == "h"  # float activation
    kind, q = stored_weight(out, mm2.input[1])
    assert kind == "cast_mul" and q.data_type == TensorProto.INT8
    assert "W2" not in _inits(out)  # still ~4x smaller
    assert rec.stats["layers_weight_only"] == 1
    assert _cos(_run(out, EVAL), _run(m, EVAL)) > 0.999


def test_float_rung_keeps_node_float_with_reason():
    m = _outlier_model()
    out, rec = _quantize(m, float_nodes=["mm2"])
    mm2 = _node(out, "mm2")
    assert mm2.input == ["h", "W2"] and _inits(out)["W2"].data_type == TensorProto.FLOAT
    assert _producer(out, _node(out, "mm1").input[1]).op_type == "DequantizeLinear"  # mm1 still quantized
    assert rec.stats["layers_float"] == 1
    assert any(s["node"] == "mm2" and "kept float" in s["reason"] for s in rec.skipped)
    assert _cos(_run(out, EVAL), _run(m, EVAL)) > 0.999


# ------------------------------------------------------------------------------------------ overrides
@pytest.mark.parametrize(
    "pattern,hits", [("mm2", {"mm2"}), ("mm*", {"mm1", "mm2"}), ("re:mm[2-9]", {"mm2"}), ("op:MatMul", {"mm1", "mm2"})]
)
def test_overrides_by_name_glob_regex_and_op_type(pattern, hits):
    out, rec = _quantize(_outlier_model(), float_nodes=[pattern], allow_nothing=True)
    float_nodes = {n.name for n in out.graph.node if n.op_type == "MatMul" and n.input[1] in ("W1", "W2")}
    assert float_nodes == hits
    if hits == {"mm1", "mm2"}:  # nothing left: the pass says so
        assert not rec.modified


def test_highest_requested_rung_wins_and_unmatched_pattern_is_noted():
    out, rec = _quantize(
        _outlier_model(), int16_activation_nodes=["mm*"], weight_only_nodes=["mm2"], float_nodes=["nope*"]
    )
    assert _node(out, "mm2").input[0] == "h" and rec.stats["layers_weight_only"] == 2  # mm1: int16 -> weights only
    assert any("'nope*' matches no node" in n for n in rec.notes)


def test_bad_floor_is_a_usage_error():
    with pytest.raises(UsageError, match="precision_floor_cosine"):
        optimize(
            _outlier_model(),
            [QuantizeInt8Static(**FULL, auto_precision=True, precision_floor_cosine=1.5)],
            calibration=CALIB,
        )


# ------------------------------------------------------------------------------------------ auto_precision
# Conv: int16 where the opset allows it, else weights only. MatMul and Gemm: int16 activations become
# MatMulNBits in ORT's default mode, which re-quantizes the activation to int8 (see above), so int16 misses the
# floor there; weights only (Cast + Mul, folded at load) holds it. The search judges both modes and sees that.
@pytest.mark.parametrize(
    "op,opset,rung",
    [("Conv", 17, "weight_only"), ("Conv", 21, "int16"), ("MatMul", 17, "weight_only"), ("Gemm", 21, "weight_only")],
)
def test_auto_precision_moves_the_outlier_layer_up_and_meets_the_floor(op, opset, rung):
    m = _outlier_model(opset, op=op)
    out, rec = _quantize(m, auto_precision=True, precision_floor_cosine=0.999)
    assert rec.stats[f"layers_{rung}"] == 1 and rec.stats["output_cosine"] >= 0.999
    assert sum(v for k, v in rec.stats.items() if k.startswith("layers_") and k != "layers_probed") == 1
    assert any(f"mm2 moved int8 -> {rung}" in n for n in rec.notes)
    assert _producer(out, _node(out, "mm1").input[1]).op_type == "DequantizeLinear"  # mm1 stays int8
    for optimized in (False, True):  # held-out data, not the calibration samples
        assert _cos(_run(out, EVAL, optimized), _run(m, EVAL, optimized)) >= 0.999


def test_auto_precision_leaves_a_model_that_meets_the_floor_alone():
    m = _outlier_model(outlier=1.0)
    naive, _ = _quantize(m)
    out, rec = _quantize(m, auto_precision=True, precision_floor_cosine=0.99)
    assert out.SerializeToString() == naive.SerializeToString()
    assert rec.stats["sensitivity_sessions"] == 4 and "layers_probed" not in rec.stats  # 2 references + 1 try


AUTO_MODELS = [m for m in MODELS if m["name"] in ("cnn_digits", "transformer_text")]


@pytest.mark.parametrize("entry", AUTO_MODELS, ids=[m["name"] for m in AUTO_MODELS])
def test_sample_models_with_auto_precision_keep_accuracy(entry):
    # A floor above what all-int8 reaches (cosine ~0.99997 on both), so the search has to move layers.
    spec = f"{Q}:auto_precision=true,precision_floor_cosine=0.99999"
    out, rep = optimize(SAMPLES / entry["path"], [*DEFAULT_PASSES, spec], calibration=SAMPLES / entry["calib"])
    rec = rep.passes[-1]
    moved = sum(rec.stats.get(f"layers_{r}", 0) for r in ("int16", "weight_only", "float"))
    assert rec.stats["layers_probed"] > 0 and moved > 0
    assert rec.stats["weights_quantized"] > 0
    sess = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    feeds = eval_feeds(entry)
    outs = [dict(zip(names, sess.run(None, {k: v for k, v in f.items() if not k.startswith("__")}))) for f in feeds]
    assert accuracy(entry, outs, feeds) >= entry["float_metric"] - 0.01


def test_float_rung_keeps_the_original_bias_despite_bias_correction():
    # Bias correction shifts the biases of planned layers before the rungs are applied; a layer kept float has
    # float weights, so it must get its own bias back unchanged.
    r = np.random.default_rng(3)
    w1, w2 = r.standard_normal((8, 4, 3, 3)).astype(np.float32), r.standard_normal((4, 8, 3, 3)).astype(np.float32)
    b1, b2 = r.standard_normal(8).astype(np.float32), r.standard_normal(4).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["h"], name="c1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["hr"]),
        helper.make_node("Conv", ["hr", "W2", "B2"], ["y"], name="c2", pads=[1, 1, 1, 1]),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "W1"), (w2, "W2"), (b1, "B1"), (b2, "B2"))],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    calib = [{"x": r.standard_normal((1, 4, 6, 6)).astype(np.float32) + 0.5} for _ in range(8)]
    out, rep = optimize(m, [QuantizeInt8Static(**FULL, float_nodes=["c2"], bias_correction=True)], calibration=calib)
    c2 = _node(out, "c2")
    inits = _inits(out)
    assert c2.input[1] == "W2" and numpy_helper.to_array(inits[c2.input[1]]).dtype == np.float32
    np.testing.assert_array_equal(numpy_helper.to_array(inits[c2.input[2]]), b2)
    assert rep.passes[0].stats["layers_float"] == 1


def test_auto_precision_with_the_decision_metric_or_a_user_metric(tmp_path):
    m = _outlier_model(17, op="MatMul")
    out, rec = _quantize(m, auto_precision=True, precision_floor_cosine=0.999, precision_metric="decisions")
    assert any("output decision score" in n for n in rec.notes) and rec.stats["output_score"] >= 0.999
    assert rec.stats["layers_weight_only"] == 1  # the outlier layer moves up, as with the cosine
    script = tmp_path / "metric.py"
    script.write_text(
        "import numpy as np\n"
        "def agree(ref, cand):\n"
        "    cos = lambda a, b: float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b)))\n"
        "    return float(np.mean([cos(r['y'], c['y']) > 0.999 for r, c in zip(ref, cand)]))\n"
    )
    out, rec = _quantize(m, auto_precision=True, precision_floor_cosine=0.99, precision_metric=f"{script}:agree")
    assert any("output metric score" in n for n in rec.notes)
    with pytest.raises(UsageError, match="precision_metric must be"):
        QuantizeInt8Static(precision_metric="nearest")


def test_auto_precision_stops_at_its_time_budget():
    m = _outlier_model(17, op="MatMul")
    out, rec = _quantize(m, auto_precision=True, precision_floor_cosine=0.999, sensitivity_time_budget_s=1e-9)
    assert any("stopped at the time budget" in n for n in rec.notes), rec.notes
    assert "layers_probed" not in rec.stats and "layers_weight_only" not in rec.stats  # nothing moved in time
    assert rec.stats["weights_quantized"] == 2  # still a quantized model: the requested rungs
