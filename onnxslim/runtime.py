"""onnxruntime sessions: provider names, which provider really ran, reference (unoptimized) runs."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from .errors import BadInputError, UsageError

__all__ = [
    "node_placement",
    "normalize_provider",
    "available_providers",
    "make_session",
    "SessionInfo",
    "run_session",
    "PROVIDER_ALIASES",
]

log = logging.getLogger(__name__)

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "gpu": "CUDAExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "ov": "OpenVINOExecutionProvider",
    "dml": "DmlExecutionProvider",
    "directml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "nnapi": "NnapiExecutionProvider",
    "acl": "ACLExecutionProvider",
    "dnnl": "DnnlExecutionProvider",
    "webgpu": "WebGpuExecutionProvider",
}


def normalize_provider(name: str) -> str:
    """'cuda', 'CUDA', 'CUDAExecutionProvider' -> 'CUDAExecutionProvider' (case-insensitive)."""
    key = name.strip().lower()
    if key in PROVIDER_ALIASES:
        return PROVIDER_ALIASES[key]
    full = {v.lower(): v for v in PROVIDER_ALIASES.values()}
    if key in full:
        return full[key]
    if key.endswith("executionprovider"):
        return name.strip()
    try:
        import onnxruntime as ort

        for p in ort.get_all_providers():
            if p.lower() in (key, key + "executionprovider"):
                return p
    except ImportError:
        pass
    raise UsageError(f"unknown execution provider '{name}'; use e.g. cpu, cuda, tensorrt, openvino")


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


@dataclass
class SessionInfo:
    session: object
    requested: str
    used: list[str] = field(default_factory=list)

    @property
    def really_on_requested(self) -> bool:
        return bool(self.used) and self.used[0] == self.requested


def make_session(
    model: onnx.ModelProto | str | os.PathLike,
    provider: str = "cpu",
    *,
    optimize: bool = False,
    threads: int | None = None,
    seed: int = 0,
    external_files: dict[str, Any] | None = None,
) -> SessionInfo:
    """A session on one provider. ``optimize=False`` disables ORT graph rewrites (reference runs).
    ``external_files``: external-data file name -> its bytes (a buffer, e.g. a memory map), for a model whose
    external data is not next to it."""
    import onnxruntime as ort

    full = normalize_provider(provider)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    opts.log_severity_level = 4  # failures surface as exceptions with context; no second copy on stderr
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if external_files:
        names = list(external_files)
        opts.add_external_initializers_from_files_in_memory(
            names, [external_files[n] for n in names], [len(external_files[n]) for n in names]
        )
    providers = [full] if full == "CPUExecutionProvider" else [full, "CPUExecutionProvider"]
    src = str(model) if isinstance(model, (str, os.PathLike)) else model.SerializeToString()
    try:
        sess = ort.InferenceSession(src, sess_options=opts, providers=providers)
    except Exception as e:
        raise BadInputError(f"onnxruntime could not load the model on {full}: {str(e).splitlines()[0]}") from e
    return SessionInfo(sess, full, list(sess.get_providers()))


def run_session(
    info: SessionInfo, feeds: dict[str, np.ndarray], outputs: Iterable[str] | None = None
) -> dict[str, np.ndarray]:
    sess = info.session
    names = list(outputs) if outputs is not None else [o.name for o in sess.get_outputs()]
    values = sess.run(names, feeds)
    return dict(zip(names, values))


def node_placement(
    model: onnx.ModelProto | str | os.PathLike, provider: str, feeds: dict[str, np.ndarray]
) -> dict[str, int]:
    """How many executed nodes each provider ran, from one profiled run (fallbacks show up as CPU)."""
    import json
    from collections import Counter

    import onnxruntime as ort

    from .temp_files import private_temp_dir

    full = normalize_provider(provider)
    with private_temp_dir("placement") as tmp:
        opts = ort.SessionOptions()
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "placement")
        opts.log_severity_level = 3
        src = str(model) if isinstance(model, (str, os.PathLike)) else model.SerializeToString()
        providers = [full] if full == "CPUExecutionProvider" else [full, "CPUExecutionProvider"]
        sess = ort.InferenceSession(src, sess_options=opts, providers=providers)
        sess.run(None, feeds)
        with open(sess.end_profiling()) as f:
            events = json.load(f)
    counts: Counter[str] = Counter()
    for e in events:
        args = e.get("args") or {}
        if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time") and "provider" in args:
            counts[args["provider"]] += 1
    return dict(counts)
