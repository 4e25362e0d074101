"""Evaluated candidates kept on disk, so an interrupted search picks up where it stopped.

An entry is keyed by everything its result depends on: the base model's bytes, the configuration, the data's
files (names, sizes, modification times), the metric, the seed and the onnxslim version. It holds the
candidate's measured result (JSON) and its model file; a JSON without its model, or a model without its JSON
(a run killed between the two writes) is not a hit.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .._version import __version__
from ..report import write_json_atomic

__all__ = ["CandidateCache", "file_digest", "data_identity"]


def file_digest(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def data_identity(spec: Any) -> str:
    """What identifies a data source for the cache: its files' names, sizes and mtimes, or its text."""
    if spec is None:
        return "none"
    text = str(spec)
    path = Path(text)
    if path.is_dir():
        parts = [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(path.iterdir()) if p.is_file()]
        return text + "|" + "|".join(parts)
    if path.is_file():
        return f"{text}|{path.stat().st_size}:{path.stat().st_mtime_ns}"
    script = Path(text.rpartition(":")[0])
    if script.is_file():
        return f"{text}|{script.stat().st_size}:{script.stat().st_mtime_ns}"
    return text


class CandidateCache:
    def __init__(self, folder: str | os.PathLike, identity: dict[str, Any]):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.identity = {**identity, "onnxslim": __version__}
        self.hits = 0

    def key(self, config: dict[str, str], extra: str = "") -> str:
        body = json.dumps({"id": self.identity, "config": sorted(config.items()), "extra": extra}, sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()[:24]

    def model_path(self, key: str) -> Path:
        return self.folder / f"{key}.onnx"

    def get(self, key: str) -> dict | None:
        meta = self.folder / f"{key}.json"
        if not meta.exists() or not self.model_path(key).exists():
            return None
        try:
            result = json.loads(meta.read_text())
        except (OSError, ValueError):
            return None
        self.hits += 1
        return result

    def put(self, key: str, result: dict) -> None:
        write_json_atomic(self.folder / f"{key}.json", json.dumps(result, indent=1, sort_keys=True))

    def get_json(self, name: str) -> Any:
        path = self.folder / name
        try:
            return json.loads(path.read_text()) if path.exists() else None
        except (OSError, ValueError):
            return None

    def put_json(self, name: str, value: Any) -> None:
        write_json_atomic(self.folder / name, json.dumps(value, indent=1, sort_keys=True))
