"""One exception family. Each kind maps to one CLI exit code."""

from __future__ import annotations

__all__ = [
    "OnnxSlimError",
    "BadInputError",
    "UsageError",
    "PassError",
    "PluginError",
    "GateFailedError",
]


class OnnxSlimError(Exception):
    """Base of every error onnxslim raises on purpose. Messages say what is wrong and how to fix it."""

    exit_code = 2


class BadInputError(OnnxSlimError):
    """The model, data or config given to us is unusable (missing, corrupt, wrong names/dtypes/shapes)."""

    exit_code = 2


class UsageError(OnnxSlimError):
    """Options that contradict each other, unknown pass names, bad option values."""

    exit_code = 2


class PluginError(UsageError):
    """A registered pass could not be imported or is not a Pass."""


class PassError(OnnxSlimError):
    """A pass raised or left an invalid graph. Carries the pass name and the passes that ran before."""

    exit_code = 3

    def __init__(self, pass_name: str | None, message: str, *, before: list[str] | None = None):
        self.pass_name = pass_name
        self.before = list(before or [])
        ran = ", ".join(dict.fromkeys(self.before))
        if pass_name is None:  # found after all passes ran (export, contract, checker)
            super().__init__(f"the optimized model is invalid (passes run: {ran or 'none'}): {message}")
        else:
            super().__init__(f"pass '{pass_name}' failed{f' (after: {ran})' if ran else ''}: {message}")


class GateFailedError(OnnxSlimError):
    """A parity or quality gate did not hold."""

    exit_code = 1
