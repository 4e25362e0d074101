"""onnxslim: make exported ONNX models smaller and faster, and prove they still give the same answers."""

from __future__ import annotations

from ._version import __version__
from .auto import AutoResult, auto_compress
from .data import FeedData, load_feeds
from .errors import BadInputError, GateFailedError, OnnxSlimError, PassError, PluginError, UsageError
from .graph import LoadedModel, ModelContract, load_model
from .model_save import save_model
from .parity import ParityResult, check
from .pass_base import Pass, PassContext, PassResult, SkippedNode, iter_graphs
from .pipeline import DEFAULT_PASSES, OptimizeResult, PassSpec, optimize
from .registry import available_passes, get_pass, register_pass
from .report import PassRecord, Report
from .summary import ModelSummary, summarize

__all__ = [
    "__version__",
    "optimize",
    "auto_compress",
    "AutoResult",
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


def _import_checkout_passes() -> None:
    """In a plain checkout (not installed) the built-in passes live in the top-level ``passes/`` folder; make
    them importable under the name the install gives them, ``onnxslim.passes`` (tests and tools then run
    from the checkout as they do installed)."""
    import importlib.util
    import sys
    from pathlib import Path

    if importlib.util.find_spec(f"{__name__}.passes") is not None:
        return
    folder = Path(__file__).resolve().parent.parent / "passes"
    if not (folder / "__init__.py").is_file():
        return
    spec = importlib.util.spec_from_file_location(
        f"{__name__}.passes", folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)


_import_checkout_passes()
