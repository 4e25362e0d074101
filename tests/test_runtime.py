"""Provider names and what really ran."""

from __future__ import annotations

import numpy as np
import pytest

from onnxslim.errors import UsageError
from onnxslim.runtime import make_session, node_placement, normalize_provider

from conftest import SAMPLES


@pytest.mark.parametrize(
    "given,full",
    [
        ("cpu", "CPUExecutionProvider"),
        ("CUDA", "CUDAExecutionProvider"),
        ("trt", "TensorrtExecutionProvider"),
        ("OpenVINO", "OpenVINOExecutionProvider"),
        ("cudaexecutionprovider", "CUDAExecutionProvider"),
    ],
)
def test_provider_names_are_case_insensitive(given, full):
    assert normalize_provider(given) == full


def test_unknown_provider_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown execution provider 'warp-drive'"):
        normalize_provider("warp-drive")


def test_session_reports_the_provider_really_used():
    info = make_session(str(SAMPLES / "cnn_digits" / "model.onnx"), "cpu")
    assert info.used[0] == "CPUExecutionProvider" and info.really_on_requested


def test_node_placement_counts_executed_nodes_per_provider():
    counts = node_placement(
        str(SAMPLES / "cnn_digits" / "model.onnx"), "cpu", {"input": np.zeros((2, 1, 8, 8), np.float32)}
    )
    assert set(counts) == {"CPUExecutionProvider"} and counts["CPUExecutionProvider"] >= 5
