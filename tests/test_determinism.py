"""Deterministic by default: the same command twice gives byte-identical models (and data files) and the same
report apart from timings, for the lossless pipeline on every sample model and for each compression family."""

from __future__ import annotations

import json
import re

import pytest

from onnxslim.cli import main

from conftest import SAMPLES

_TIMING_KEYS = {"seconds", "wall_s", "elapsed_s", "latency"}


def _strip(obj, where: str):
    """The report without timings, with the run's folder replaced by a placeholder."""
    if isinstance(obj, dict):
        return {k: _strip(v, where) for k, v in obj.items() if k not in _TIMING_KEYS}
    if isinstance(obj, list):
        return [_strip(v, where) for v in obj]
    if isinstance(obj, str):  # notes say how long a stage took: "measured in 0.2s"
        return re.sub(r"\b\d+(\.\d+)?\s?s\b", "<t>s", obj.replace(where, "<run>"))
    return obj


def _run(tmp_path, tag: str, argv: list[str]) -> tuple[dict[str, bytes], dict]:
    folder = tmp_path / tag
    folder.mkdir()
    out, rep = folder / "out.onnx", folder / "report.json"
    assert main([argv[0], argv[1], "-o", str(out), "--report", str(rep), "-q", *argv[2:]]) == 0
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "report.json"}
    return files, _strip(json.loads(rep.read_text()), str(folder))


def _names():
    return [m["name"] for m in json.loads((SAMPLES / "manifest.json").read_text())["models"]]


CNN = SAMPLES / "cnn_digits"
FAMILIES = {
    "int8": ["--quantize", "int8", "--calib", str(CNN / "calib")],
    "prune_sparsegpt": ["--prune", "0.5", "--calib", str(CNN / "calib")],
    "prune_channels": [
        "--prune-channels",
        "0.25",
        "--prune-option",
        "channel_multiple=1",
        "--calib",
        str(CNN / "calib"),
    ],
    "share_kmeans": ["--share", "4", "--calib", str(CNN / "calib")],
}


@pytest.mark.parametrize("name", _names())
def test_lossless_twice_is_byte_identical(name, tmp_path):
    argv = ["optimize", str(SAMPLES / name / "model.onnx")]
    a, ra = _run(tmp_path, "a", argv)
    b, rb = _run(tmp_path, "b", argv)
    assert a == b
    assert ra == rb


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_compression_twice_is_byte_identical(family, tmp_path):
    argv = ["optimize", str(CNN / "model.onnx"), *FAMILIES[family]]
    a, ra = _run(tmp_path, "a", argv)
    b, rb = _run(tmp_path, "b", argv)
    assert a.keys() == b.keys() and "out.onnx" in a
    assert a == b, [k for k in a if a[k] != b[k]]
    assert ra == rb
    assert any(p["modified"] and not p["exact"] for p in ra["passes"])  # the lossy pass really ran


def test_the_seed_is_recorded_and_a_rerun_with_it_repeats_the_run(tmp_path):
    base = ["optimize", str(CNN / "model.onnx"), *FAMILIES["share_kmeans"], "--seed", "7"]
    a, ra = _run(tmp_path, "a", base)
    b, rb = _run(tmp_path, "b", base)
    assert ra["seed"] == rb["seed"] == 7 and a == b and ra == rb
