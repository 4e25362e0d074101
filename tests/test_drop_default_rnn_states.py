"""drop_default_rnn_states: tiny LSTM/GRU graphs -> checker -> pass -> structure -> ORT parity -> idempotence."""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxslim.pipeline import optimize
from onnxslim.registry import get_pass
from onnxslim.runtime import make_session

from _fusion_testlib import init, model, ops, rng, run_pass
from conftest import SAMPLES, eval_feeds

Pass = get_pass("drop_default_rnn_states")
SEQ, IN, HID = 5, 3, 4


def _weights(op: str, dirs: int = 1):
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    r = rng(3)
    return [
        init("W", r.standard_normal((dirs, gates * HID, IN)).astype(np.float32)),
        init("R", r.standard_normal((dirs, gates * HID, HID)).astype(np.float32)),
        init("B", r.standard_normal((dirs, 2 * gates * HID)).astype(np.float32)),
    ]


def _shape_chain_state(dirs: int = 1) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """torch's export of a zero state: ConstantOfShape([dirs, batch, hidden]) with batch from Shape(x)."""
    nodes = [
        helper.make_node("Shape", ["x"], ["sh"]),
        helper.make_node("Gather", ["sh", "one"], ["batch"], axis=0),
        helper.make_node("Unsqueeze", ["batch", "ax0"], ["batch1"]),
        helper.make_node("Concat", ["dirs", "batch1", "hid"], ["state_shape"], axis=0),
        helper.make_node(
            "ConstantOfShape", ["state_shape"], ["h0"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0])
        ),
    ]
    inits = [
        init("one", np.array(1, np.int64)),
        init("ax0", np.array([0], np.int64)),
        init("dirs", np.array([dirs], np.int64)),
        init("hid", np.array([HID], np.int64)),
    ]
    return nodes, inits


def _lstm_inputs(m: onnx.ModelProto, op: str) -> list[str]:
    return [list(n.input) for n in m.graph.node if n.op_type == op][0]


def _feeds(batch_sizes=(2, 3)):
    r = rng(7)
    return [{"x": r.standard_normal((SEQ, b, IN)).astype(np.float32)} for b in batch_sizes]


def test_lstm_zero_states_from_a_shape_chain_are_dropped_and_the_chain_dies():
    chain, chain_inits = _shape_chain_state()
    lstm = helper.make_node("LSTM", ["x", "W", "R", "B", "", "h0", "h0"], ["y", "yh", "yc"], hidden_size=HID)
    m = model(
        chain + [lstm],
        [("x", [SEQ, "batch", IN])],
        [("y", None), ("yh", None)],
        _weights("LSTM") + chain_inits,
        opset=14,
    )
    out = run_pass(Pass(), m, feeds=_feeds())
    assert _lstm_inputs(out, "LSTM") == ["x", "W", "R", "B"]
    # Together with dead-code removal the whole shape chain goes.
    slim, _ = optimize(m, ["drop_default_rnn_states", "eliminate_dead_nodes"], fixed_point=False)
    assert dict(ops(slim)) == {"LSTM": 1}


def test_gru_zero_initializer_state_and_zero_bias_and_full_lengths_are_dropped():
    w = _weights("GRU")[:2]
    gru = helper.make_node(
        "GRU", ["x", "W", "R", "Bz", "lens", "h0"], ["y", "yh"], hidden_size=HID, linear_before_reset=1
    )
    m = model(
        [gru],
        [("x", [SEQ, 2, IN])],
        [("y", None), ("yh", None)],
        w
        + [
            init("Bz", np.zeros((1, 6 * HID), np.float32)),
            init("lens", np.full(2, SEQ, np.int32)),
            init("h0", np.zeros((1, 2, HID), np.float32)),
        ],
        opset=14,
    )
    out = run_pass(Pass(), m, feeds=_feeds((2, 2)))
    assert _lstm_inputs(out, "GRU") == ["x", "W", "R"]
    assert not {i.name for i in out.graph.initializer} & {"Bz", "lens", "h0"}


def test_gru_state_removed_but_nonzero_bias_kept_as_middle_inputs():
    gru = helper.make_node("GRU", ["x", "W", "R", "B", "", "h0"], ["y"], hidden_size=HID)
    m = model(
        [gru],
        [("x", [SEQ, 2, IN])],
        [("y", None)],
        _weights("GRU") + [init("h0", np.zeros((1, 2, HID), np.float32))],
        opset=14,
    )
    out = run_pass(Pass(), m, feeds=_feeds((2, 2)))
    assert _lstm_inputs(out, "GRU") == ["x", "W", "R", "B"]


def test_nonzero_or_negative_zero_states_and_short_lengths_are_kept():
    h0 = np.zeros((1, 2, HID), np.float32)
    h0[0, 1, 2] = 0.5
    c0 = np.full((1, 2, HID), -0.0, np.float32)
    lstm = helper.make_node("LSTM", ["x", "W", "R", "B", "lens", "h0", "c0"], ["y"], hidden_size=HID)
    m = model(
        [lstm],
        [("x", [SEQ, 2, IN])],
        [("y", None)],
        _weights("LSTM") + [init("lens", np.array([SEQ, SEQ - 2], np.int32)), init("h0", h0), init("c0", c0)],
        opset=14,
    )
    out = run_pass(Pass(), m, expect_modified=False, feeds=_feeds((2, 2)))
    assert _lstm_inputs(out, "LSTM") == ["x", "W", "R", "B", "lens", "h0", "c0"]


def test_dynamic_sequence_length_keeps_sequence_lens():
    lstm = helper.make_node("LSTM", ["x", "W", "R", "B", "lens"], ["y"], hidden_size=HID)
    m = model(
        [lstm],
        [("x", ["seq", 2, IN])],
        [("y", None)],
        _weights("LSTM") + [init("lens", np.full(2, SEQ, np.int32))],
        opset=14,
    )
    out = run_pass(Pass(), m, expect_modified=False, feeds=_feeds((2, 2)))
    assert "lens" in _lstm_inputs(out, "LSTM")


def test_bidirectional_lstm_with_zero_peepholes_and_states():
    chain, chain_inits = _shape_chain_state(dirs=2)
    lstm = helper.make_node(
        "LSTM", ["x", "W", "R", "B", "", "h0", "h0", "P"], ["y", "yh", "yc"], hidden_size=HID, direction="bidirectional"
    )
    m = model(
        chain + [lstm],
        [("x", [SEQ, "batch", IN])],
        [("y", None), ("yc", None)],
        _weights("LSTM", dirs=2) + chain_inits + [init("P", np.zeros((2, 3 * HID), np.float32))],
        opset=14,
    )
    out = run_pass(Pass(), m, feeds=_feeds())
    assert _lstm_inputs(out, "LSTM") == ["x", "W", "R", "B"]
    _, report = optimize(m, [Pass()], fixed_point=False)
    assert report.passes[0].stats == {"initial_h_removed": 1, "initial_c_removed": 1, "P_removed": 1}


def test_gru_digits_default_pipeline_reaches_onnxsim_node_count():
    entry = next(e for e in json.loads((SAMPLES / "manifest.json").read_text())["models"] if e["name"] == "gru_digits")
    src = onnx.load(SAMPLES / entry["path"])
    out, _ = optimize(src)
    assert sum(ops(out).values()) <= 6
    assert "ConstantOfShape" not in ops(out)
    before = make_session(src).session
    after = make_session(out).session
    for feed in eval_feeds(entry):
        feed = {k: v for k, v in feed.items() if k != "__label__"}
        for a, b in zip(before.run(None, feed), after.run(None, feed)):
            np.testing.assert_array_equal(a, b)
