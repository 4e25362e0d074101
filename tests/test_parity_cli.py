"""`onnxslim check` and `onnxslim optimize --check-data`: exit codes, reports, explain."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from test_parity import CNN, CNN_EVAL, PLANTED_NODE, ROOT, planted_cnn

from onnxslim.cli import main
from onnxslim.parity import ParityResult
from onnxslim.report import Report


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    return planted_cnn(tmp_path_factory.mktemp("planted_cli"))


def test_check_identical_exits_0_and_writes_a_round_tripping_report(tmp_path, capsys):
    rep = tmp_path / "r.json"
    assert (
        main(
            [
                "check",
                str(CNN),
                str(CNN),
                "--data",
                str(CNN_EVAL),
                "--max-samples",
                "2",
                "--providers",
                "CPU,cuda",
                "--report",
                str(rep),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "parity (exact): pass" in out and "logits" in out
    d = json.loads(rep.read_text())
    assert d["verdict"] == "pass" and d["data"]["samples"] == 2
    assert ParityResult.from_dict(d).to_dict() == d


def test_check_planted_change_exits_1_and_explain_names_the_layer(planted, tmp_path, capsys):
    rep = tmp_path / "r.json"
    assert (
        main(
            [
                "check",
                str(CNN),
                str(planted),
                "--data",
                str(CNN_EVAL),
                "--max-samples",
                "2",
                "--explain",
                "--report",
                str(rep),
            ]
        )
        == 1
    )
    out = capsys.readouterr().out
    assert f"first divergent tensor '{PLANTED_NODE}_output_0'" in out
    assert json.loads(rep.read_text())["explain"]["first_divergent"]["node"] == PLANTED_NODE
    # Loosen the gate per output: the same run passes.
    assert (
        main(
            [
                "check",
                str(CNN),
                str(planted),
                "--data",
                str(CNN_EVAL),
                "--max-samples",
                "1",
                "-q",
                "--threshold",
                "logits:atol=100",
            ]
        )
        == 0
    )


def test_required_provider_missing_exits_1(capsys):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA in onnxruntime")
    args = ["check", str(CNN), str(CNN), "--data", str(CNN_EVAL), "--max-samples", "1", "--providers", "cpu,cuda"]
    assert main(args) == 0
    assert "provider skipped: CUDAExecutionProvider" in capsys.readouterr().out
    assert main(args + ["--require-providers"]) == 1
    assert "required provider CUDAExecutionProvider did not run" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra",
    [
        ["--data", "/nonexistent/eval.npz"],
        ["--providers", "warpdrive"],
        ["--shapes", "input:1x2"],
        ["--threshold", "logits"],
        ["--floor", "cosine=0.9", "--mode", "exact"],  # floors are lossy floors
    ],
)
def test_bad_input_exits_2(extra, capsys):
    assert main(["check", str(CNN), str(CNN), *extra]) == 2
    assert "onnxslim: error:" in capsys.readouterr().err


def test_missing_model_exits_2(tmp_path, capsys):
    assert main(["check", str(CNN), str(tmp_path / "nope.onnx")]) == 2


def test_synthetic_check_says_so(capsys):
    assert (
        main(
            [
                "check",
                str(ROOT / "transformer_text" / "model.onnx"),
                str(ROOT / "transformer_text" / "model.onnx"),
                "--shapes",
                "input_ids:1x6,attention_mask:1x6",
                "--samples",
                "2",
                "--json",
            ]
        )
        == 0
    )
    d = json.loads(capsys.readouterr().out)
    assert d["data"]["synthetic"] is True and "SYNTHETIC" in d["notes"][0]
    assert d["data"]["plan"]["input_ids"]["shape"] == [1, 6]


def test_optimize_with_check_data_puts_parity_in_the_report(tmp_path, capsys):
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    assert (
        main(
            [
                "optimize",
                str(CNN),
                "-o",
                str(out),
                "--check-data",
                str(CNN_EVAL),
                "--max-samples",
                "2",
                "--report",
                str(rep),
                "-q",
            ]
        )
        == 0
    )
    report = Report.from_json(rep.read_text())
    assert report.parity["verdict"] == "pass" and report.parity["mode"] == "exact"
    assert report.parity["candidate"] == str(out)
    assert Report.from_json(report.to_json()).to_dict() == report.to_dict()


def test_optimize_check_data_fails_gate_with_exit_1(tmp_path, capsys):
    # A cosine floor above 1 cannot be met: the gate fails, optimize exits 1, OUTPUT keeps what it held and
    # the result is kept as o.failed.onnx, a name that says so.
    out = tmp_path / "o.onnx"
    out.write_bytes(b"previous")
    assert (
        main(
            [
                "optimize",
                str(CNN),
                "-o",
                str(out),
                "--check-data",
                str(CNN_EVAL),
                "--max-samples",
                "1",
                "--cosine-min",
                "1.5",
            ]
        )
        == 1
    )
    text = capsys.readouterr().out
    assert "parity (exact): FAIL" in text
    assert "the gate failed: the result was written to" in " ".join(text.split())
    assert out.read_bytes() == b"previous"
    onnx.checker.check_model(onnx.load(str(tmp_path / "o.failed.onnx")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.failed.onnx", "o.onnx"]


def test_check_picks_lossy_mode_for_an_int8_candidate_and_says_why(tmp_path, capsys):
    # Issue 15 item 5: an int8 candidate checked without --mode used to fail with "tolerance = 1.036e+04".
    q = tmp_path / "q.onnx"
    calib = ROOT / "cnn_digits" / "calib"
    assert main(["optimize", str(CNN), "-o", str(q), "--quantize", "int8", "--calib", str(calib), "-q"]) == 0
    rep = tmp_path / "r.json"
    assert main(["check", str(CNN), str(q), "--data", str(CNN_EVAL), "--report", str(rep), "-q"]) == 0
    d = json.loads(rep.read_text())
    assert d["mode"] == "lossy"
    assert any("mode lossy (auto)" in n and "QuantizeLinear +" in n for n in d["notes"])
    # Insisting on exact fails, and the report says what the user wants instead.
    assert main(["check", str(CNN), str(q), "--data", str(CNN_EVAL), "--mode", "exact", "--report", str(rep)]) == 1
    d = json.loads(rep.read_text())
    assert d["mode"] == "exact" and any("--mode lossy" in n for n in d["notes"])
    # A lossless result stays exact.
    s = tmp_path / "s.onnx"
    assert main(["optimize", str(CNN), "-o", str(s), "-q"]) == 0
    assert main(["check", str(CNN), str(s), "--data", str(CNN_EVAL), "--report", str(rep), "-q"]) == 0
    assert json.loads(rep.read_text())["mode"] == "exact"


def test_lossy_changes_sees_pruning_and_codebooks(tmp_path):
    import onnx

    from onnxslim.lossy_changes import lossy_changes

    calib = ROOT / "cnn_digits" / "calib"
    orig = onnx.load(str(CNN))
    assert lossy_changes(orig, orig) == []
    cases = (
        (["--prune", "0.5"], "weight-decoding nodes added (BitShift"),  # stored packed
        (["-p", "prune_by_magnitude:sparsity=0.5"], "(pruned)"),  # stored dense: the zeros show
        (["--share", "4"], "weight-decoding nodes added (BitShift"),  # packed codes
        (["--share", "4", "--share-option", "decode=dense"], "codebooks"),
    )
    for flags, sign in cases:
        out = tmp_path / "c.onnx"
        assert main(["optimize", str(CNN), "-o", str(out), *flags, "--calib", str(calib), "-q"]) == 0
        assert any(sign in r for r in lossy_changes(orig, onnx.load(str(out)))), flags
