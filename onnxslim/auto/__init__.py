"""Automatic compression under an accuracy budget (``onnxslim optimize --auto``); see ``search``."""

from .executors import ProcessExecutor, RayExecutor, SerialExecutor, make_executor
from .levels import DEFAULT_LEVELS, parse_levels
from .search import AutoResult, auto_compress

__all__ = [
    "auto_compress",
    "AutoResult",
    "DEFAULT_LEVELS",
    "parse_levels",
    "make_executor",
    "SerialExecutor",
    "ProcessExecutor",
    "RayExecutor",
]
