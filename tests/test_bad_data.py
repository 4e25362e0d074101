"""Bad calibration and eval data is refused with one line naming the input and the sample."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from onnxslim.cli import main

from conftest import SAMPLES

CNN = SAMPLES / "cnn_digits" / "model.onnx"
EVAL = SAMPLES / "cnn_digits" / "eval"


def _poisoned(tmp_path, value: float, which: int = 1):
    """A copy of the CNN's eval data whose sample ``which`` holds ``value`` at one place."""
    folder = tmp_path / "data"
    folder.mkdir()
    files = sorted(EVAL.glob("*.npz"))[:3]
    for i, f in enumerate(files):
        with np.load(f) as z:
            d = {k: z[k] for k in z.files}
        if i == which:
            d["input"] = d["input"].copy()
            d["input"].reshape(-1)[0] = value
        np.savez(folder / f.name, **d)
    return folder, files[which].name


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("onnxslim: error: "), err
    return lines[0]


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_eval_data_is_an_error_naming_input_and_sample(value, tmp_path, capsys):
    data, name = _poisoned(tmp_path, value)
    assert main(["check", str(CNN), str(CNN), "--data", str(data), "--json"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert name in line and "'input'" in line and "NaN/Inf" in line


def test_non_finite_calibration_data_is_an_error_and_nothing_is_written(tmp_path, capsys):
    data, name = _poisoned(tmp_path, np.nan, which=0)
    out = tmp_path / "q.onnx"
    code = main(["optimize", str(CNN), "-o", str(out), "--quantize", "int8", "--calib", str(data)])
    assert code == 2
    assert name in _one_error_line(capsys.readouterr().err)
    assert not out.exists()


def test_non_finite_check_data_fails_before_the_output_is_written(tmp_path, capsys):
    data, name = _poisoned(tmp_path, np.nan, which=2)
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(CNN), "-o", str(out), "--check-data", str(data)]) == 2
    assert name in _one_error_line(capsys.readouterr().err)
    assert not out.exists()


def test_json_never_holds_bare_nan():
    from onnxslim.report import dumps_json

    text = dumps_json({"a": float("nan"), "b": [np.float32(np.inf), -np.inf], "c": np.array([1.0, np.nan])})
    assert "NaN," not in text.replace('"NaN"', "")
    assert json.loads(text) == {"a": "NaN", "b": ["Infinity", "-Infinity"], "c": [1.0, "NaN"]}


def test_non_zip_npz_is_not_blamed_on_pickled_data(tmp_path, capsys):
    folder = tmp_path / "c"
    folder.mkdir()
    shutil.copy(sorted(EVAL.glob("*.npz"))[0], folder / "0.npz")
    (folder / "1.npz").write_bytes(b"\x80\x04this is not a zip archive" * 8)
    assert main(["check", str(CNN), str(CNN), "--data", str(folder)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "not a zip archive" in line and "pickle" not in line
