"""Optimize settings from a config file (TOML, YAML or JSON) and from the command line — one mapping.

Both sources produce the same ``OptimizeSettings``, whose fields are exactly the keyword arguments of
``onnxslim.optimize``; config keys use the same names as the long CLI flags (``-`` or ``_`` alike).

    # slim.toml
    passes = ["eliminate_dead_nodes", "fold_constants:size_threshold=4096"]
    calib = "sample_models/cnn_digits/calib"

    [[pass]]                       # or a table per pass, options as keys
    name = "prune_by_magnitude"
    sparsity = 0.5
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import BadInputError, UsageError
from .pipeline import PassSpec

__all__ = ["OptimizeSettings", "load_config", "settings_from_mapping"]


@dataclass
class OptimizeSettings:
    passes: list[PassSpec] | None = None
    calibration: str | None = None
    fixed_point: bool | None = None
    max_iterations: int = 10
    check: str = "auto"
    on_pass_error: str = "rollback"
    external_data: bool | None = None
    shape_annotations: str = "keep"
    seed: int = 0
    opset: int | None = None

    def api_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``onnxslim.optimize`` (passes and calibration included)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


_ALIASES = {"calib": "calibration", "pass": "passes"}
_FIELDS = {f.name for f in dataclasses.fields(OptimizeSettings)}


def _pass_specs(value: Any, where: str) -> list[PassSpec]:
    items = value if isinstance(value, list) else [value]
    specs = []
    for item in items:
        if isinstance(item, str):
            specs.append(PassSpec.parse(item))
        elif isinstance(item, dict) and "name" in item:
            opts = {k: v for k, v in item.items() if k not in ("name", "options")}
            opts.update(item.get("options") or {})
            specs.append(PassSpec(str(item["name"]), opts))
        else:
            raise UsageError(f"{where}: each pass is a name string or a table with 'name'; got {item!r}")
    return specs


def settings_from_mapping(
    data: dict[str, Any], where: str = "config", base: OptimizeSettings | None = None
) -> OptimizeSettings:
    """Apply a mapping (parsed config file, or CLI values) on top of ``base``."""
    settings = dataclasses.replace(base) if base is not None else OptimizeSettings()
    if "optimize" in data and isinstance(data["optimize"], dict):
        data = {**{k: v for k, v in data.items() if k != "optimize"}, **data["optimize"]}
    passes: list[PassSpec] | None = None
    for raw_key, value in data.items():
        key = _ALIASES.get(raw_key.replace("-", "_"), raw_key.replace("-", "_"))
        if key not in _FIELDS:
            known = ", ".join(sorted(_FIELDS | set(_ALIASES)))
            raise UsageError(f"{where}: unknown setting '{raw_key}'; known settings: {known}")
        if key == "passes":
            passes = (passes or []) + _pass_specs(value, where)
        else:
            setattr(settings, key, value)
    if passes is not None:
        settings.passes = passes
    return settings


def load_config(path: str | Path) -> OptimizeSettings:
    path = Path(path)
    if not path.exists():
        raise BadInputError(f"config file not found: {path}")
    text = path.read_text()
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise BadInputError(f"{path}: unknown config format '{suffix}'; use .toml, .yaml or .json")
    except BadInputError:
        raise
    except Exception as e:
        raise BadInputError(f"{path} is not valid {suffix[1:].upper()}: {e}") from e
    if not isinstance(data, dict):
        raise BadInputError(f"{path}: expected a table of settings at the top level")
    return settings_from_mapping(data, where=str(path))
