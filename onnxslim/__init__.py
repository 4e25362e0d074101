"""onnxslim: make exported ONNX models smaller and faster, and prove they still give the same answers."""

from __future__ import annotations

__version__ = "0.1.0"

from .data import FeedData, load_feeds
from .errors import BadInputError, GateFailedError, OnnxSlimError, PassError, PluginError, UsageError
from .graph import LoadedModel, ModelContract, load_model, save_model
from .parity import ParityResult, check
from .pass_base import Pass, PassContext, PassResult, SkippedNode, iter_graphs
from .pipeline import DEFAULT_PASSES, OptimizeResult, PassSpec, optimize
from .registry import available_passes, get_pass, register_pass
from .report import PassRecord, Report
from .summary import ModelSummary, summarize

__all__ = [
    "__version__",
    "optimize",
    "check",
    "ParityResult",
    "Pass",
    "PassResult",
    "PassContext",
    "PassSpec",
    "SkippedNode",
    "register_pass",
    "get_pass",
    "available_passes",
    "iter_graphs",
    "load_model",
    "save_model",
    "load_feeds",
    "FeedData",
    "LoadedModel",
    "ModelContract",
    "ModelSummary",
    "summarize",
    "Report",
    "PassRecord",
    "OptimizeResult",
    "DEFAULT_PASSES",
    "OnnxSlimError",
    "BadInputError",
    "UsageError",
    "PassError",
    "PluginError",
    "GateFailedError",
]
