"""Long runs are not silent without a terminal (issue 15 item 2): start, progress and closing lines on stderr."""

from __future__ import annotations

import time

from onnxslim import cli_progress
from onnxslim.cli import main

from conftest import SAMPLES

CNN = SAMPLES / "cnn_digits"


def test_nested_stages_without_a_tty(capsys):
    lines = cli_progress.ProgressLines(start_after=0.05, every=0.05)
    lines.update("pass prune_by_magnitude", 0, 1)
    time.sleep(1.3)
    lines.update("calibration", 3, 8)
    time.sleep(2.3)
    lines.update("calibration", 8, 8)  # done: the pass around it is reported again
    time.sleep(1.3)
    lines.update("pass prune_by_magnitude", 1, 1)
    lines.close()
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "onnxslim: pass prune_by_magnitude: started (0/1 done)"
    assert "onnxslim: calibration: started (3/8 done)" in err
    assert any(line.startswith("onnxslim: calibration: 3/8 (38%), ") for line in err)
    i = err.index(next(line for line in err if line.startswith("onnxslim: calibration: done in")))
    assert err[-1].startswith("onnxslim: pass prune_by_magnitude: done in")
    assert any(line.startswith("onnxslim: pass prune_by_magnitude: 0/1") for line in err[i + 1 :])


def test_optimize_prints_stage_lines_when_stderr_is_not_a_terminal(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli_progress.progress_display, "start_after", 0.0)
    monkeypatch.setattr(cli_progress.progress_display, "every", 0.01)
    update = cli_progress.ProgressLines.update

    def lasting(self, stage, done, total):  # on a fast CPU a 2-sample stage ends before the ticker sees it open
        update(self, stage, done, total)
        time.sleep(0.05)

    monkeypatch.setattr(cli_progress.ProgressLines, "update", lasting)
    out = tmp_path / "q.onnx"
    argv = ["optimize", str(CNN / "model.onnx"), "-o", str(out), "--quantize", "int8", "--calib", str(CNN / "calib")]
    assert main([*argv, "--check-data", str(CNN / "eval"), "--max-samples", "2"]) == 0
    err = capsys.readouterr().err
    for stage in ("pass quantize_int8_static", "calibration", "original on CPU (reference)"):
        assert f"onnxslim: {stage}: done in" in err, stage
    assert main([*argv, "-q"]) == 0
    assert capsys.readouterr().err == ""  # -q: nothing
