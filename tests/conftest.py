from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"


def _manifest() -> list[dict]:
    return json.loads((SAMPLES / "manifest.json").read_text())["models"]


MODELS = _manifest()
MODEL_IDS = [m["name"] for m in MODELS]


@pytest.fixture(params=MODELS, ids=MODEL_IDS)
def sample(request) -> dict:
    """One sample model's manifest entry, with absolute paths added."""
    m = dict(request.param)
    m["model_path"] = SAMPLES / m["path"]
    m["calib_dir"] = SAMPLES / m["calib"]
    m["eval_dir"] = SAMPLES / m["eval"]
    return m


def eval_feeds(entry: dict) -> list[dict[str, np.ndarray]]:
    """Eval feeds of a sample model (labels split off under '__label__')."""
    out = []
    for f in sorted((SAMPLES / entry["eval"]).glob("*.npz")):
        with np.load(f) as z:
            out.append({k: z[k] for k in z.files})
    return out


def accuracy(entry: dict, outputs_per_feed: list[dict[str, np.ndarray]], feeds: list[dict]) -> float:
    correct = total = 0
    for out, feed in zip(outputs_per_feed, feeds):
        y = feed["__label__"]
        pred = out[entry["label_output"]]
        if entry["label_output_kind"] == "logits":
            pred = pred.argmax(axis=-1)
        correct += int((pred.reshape(-1) == y.reshape(-1)).sum())
        total += y.size
    return correct / total


@pytest.fixture(autouse=True)
def _quiet():
    logging.getLogger("onnxslim").setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


@pytest.fixture(autouse=True)
def _pin_host_cpu(monkeypatch):
    """Every test sees the same CPU: an x86 without VNNI (``target=auto`` -> x86-avx2: uint8 activations, 7-bit
    weights), whatever machine runs the suite. Those weights are safe for onnxruntime's int8 kernels on any CPU;
    tests that assume full 8-bit weights say ``target=x86-vnni`` and compare with ORT's reference semantics
    (graph optimizations off). Detection itself is tested with faked cpuinfo texts (test_quantize_hardware)."""
    from onnxslim.passes.quantize import _hardware

    monkeypatch.setattr(_hardware, "host_target", lambda *args, **kwargs: "x86-avx2")
