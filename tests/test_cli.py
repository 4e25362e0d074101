"""CLI: the main job, info, passes, and every error path (exit 2, one clear line, no traceback)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxslim.cli import main
from onnxslim.report import Report

from conftest import SAMPLES

CNN = SAMPLES / "cnn_digits" / "model.onnx"
CNN_CALIB = SAMPLES / "cnn_digits" / "calib"


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_optimize_writes_model_and_report(capsys, tmp_path):
    code, out, err = run_cli(
        capsys, "optimize", CNN, "-o", tmp_path / "o.onnx", "--report", tmp_path / "r.json", "--calib", CNN_CALIB
    )
    assert code == 0, err
    assert "nodes" in out and "eliminate_dead_nodes" in out
    report = Report.from_json((tmp_path / "r.json").read_text())
    assert report.before.nodes >= report.after.nodes > 0
    assert report.calibration.startswith("directory")
    onnx.checker.check_model(str(tmp_path / "o.onnx"), full_check=True)


def test_info_and_passes(capsys):
    code, out, _ = run_cli(capsys, "info", SAMPLES / "wine_ifloop" / "model.onnx")
    assert code == 0 and "If" in out and "Loop" in out and "subgraphs" in out
    code, out, _ = run_cli(capsys, "info", SAMPLES / "sklearn_cancer" / "model.onnx", "--json")
    info = json.loads(out)
    assert code == 0 and info["custom_domains"] == ["ai.onnx.ml"] and "ai.onnx.ml::Scaler" in info["op_types"]
    code, out, _ = run_cli(capsys, "passes", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert code == 0 and rows["eliminate_dead_nodes"]["kind"] == "exact" and rows["eliminate_dead_nodes"]["default"]


def test_config_file_drives_optimize(capsys, tmp_path):
    cfg = tmp_path / "slim.toml"
    cfg.write_text('passes = ["eliminate_dead_nodes"]\nfixed_point = false\n')
    code, out, err = run_cli(capsys, "optimize", CNN, "-o", tmp_path / "o.onnx", "--config", cfg, "--json")
    assert code == 0, err
    assert [p["name"] for p in json.loads(out)["passes"]] == ["eliminate_dead_nodes"]


def _bad_calib(tmp_path: Path, kind: str) -> Path:
    d = tmp_path / f"calib_{kind}"
    d.mkdir()
    good = {"input": np.zeros((1, 1, 8, 8), np.float32)}
    bad = {
        "names": {"image": good["input"]},
        "dtype": {"input": good["input"].astype(np.float64)},
        "shape": {"input": np.zeros((1, 1, 9, 8), np.float32)},
        "rank": {"input": np.zeros((8, 8), np.float32)},
    }[kind]
    np.savez(d / "0000.npz", **bad)
    return d


@pytest.mark.parametrize(
    "case,expected",
    [
        ("missing", "model file not found"),
        ("directory", "is a directory"),
        ("corrupt", "not a readable ONNX model"),
        ("truncated", "not a readable ONNX model"),
        ("empty", "is empty"),
        ("missing_external", "external data file 'w.bin'.*missing"),
        ("calib_names", "not inputs of the model.*its inputs: input"),
        ("calib_dtype", "dtype float64, the model expects float32"),
        ("calib_shape", r"dim 2 must be 8"),
        ("calib_rank", "rank 4"),
        ("calib_missing", "data not found"),
        ("calib_empty_dir", "has no .npz files"),
        ("calib_not_npz", "not a readable .npz"),
        ("unknown_pass", "unknown pass 'fold_everything'"),
        ("bad_option", "unknown option"),
        ("same_output", "is the input model"),
        ("missing_out_dir", "does not exist"),
        ("bad_config", "not valid TOML"),
    ],
)
def test_error_paths_exit_2_with_one_clear_line(capsys, tmp_path, case, expected):
    model = tmp_path / "m.onnx"
    shutil.copy(CNN, model)
    args = ["optimize", model, "-o", tmp_path / "out.onnx"]
    if case == "missing":
        args[1] = tmp_path / "nope.onnx"
    elif case == "directory":
        args[1] = tmp_path
    elif case == "corrupt":
        model.write_bytes(b"\x12\x34not an onnx model at all" * 20)
    elif case == "truncated":
        model.write_bytes(CNN.read_bytes()[:5000])
    elif case == "empty":
        model.write_bytes(b"")
    elif case == "missing_external":
        m = onnx.load(str(CNN))
        onnx.save(m, str(model), save_as_external_data=True, location="w.bin", size_threshold=0)
        (tmp_path / "w.bin").unlink()
    elif case.startswith("calib_") and case[6:] in ("names", "dtype", "shape", "rank"):
        args += ["--calib", _bad_calib(tmp_path, case[6:])]
    elif case == "calib_missing":
        args += ["--calib", tmp_path / "nowhere"]
    elif case == "calib_empty_dir":
        (tmp_path / "empty").mkdir()
        args += ["--calib", tmp_path / "empty"]
    elif case == "calib_not_npz":
        (tmp_path / "c").mkdir()
        (tmp_path / "c" / "0.npz").write_bytes(b"junk")
        args += ["--calib", tmp_path / "c"]
    elif case == "unknown_pass":
        args += ["--pass", "fold_everything"]
    elif case == "bad_option":
        args += ["--pass", "eliminate_dead_nodes:speed=11"]
    elif case == "same_output":
        args[3] = model
    elif case == "missing_out_dir":
        args[3] = tmp_path / "no" / "such" / "dir" / "o.onnx"
    elif case == "bad_config":
        (tmp_path / "c.toml").write_text("passes = [unclosed")
        args += ["--config", tmp_path / "c.toml"]
    before = model.read_bytes() if model.exists() and model.is_file() else None
    code, out, err = run_cli(capsys, *args)
    assert code == 2, (out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("onnxslim: error: "), err
    assert "Traceback" not in err
    import re

    assert re.search(expected, lines[0]), lines[0]
    if before is not None:
        assert model.read_bytes() == before, "the input must never be modified"
    assert not (tmp_path / "out.onnx").exists(), "nothing is written on bad input"


def test_verbose_shows_the_traceback(capsys, tmp_path):
    code, _, err = run_cli(capsys, "optimize", tmp_path / "nope.onnx", "-o", tmp_path / "o.onnx", "--verbose")
    assert code == 2 and "Traceback" in err


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["optimize"])
    assert e.value.code == 2
    assert main([]) == 2


def test_console_script_is_installed(tmp_path):
    exe = Path(sys.executable).parent / "onnxslim"
    proc = subprocess.run([str(exe), "info", str(CNN)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "Conv" in proc.stdout
