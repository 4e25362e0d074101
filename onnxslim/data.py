"""Feed data from files, scripts, iterables and onnxruntime-style readers, streamed one feed at a time.

Formats (the ``--calib`` / ``--data`` contract):
- a directory of ``.npz`` files, one feed dict per file (keys are input names), read in sorted order;
- a single ``.npz`` file (one feed dict);
- ``script.py:function`` — the function returns an iterable of feed dicts;
- from Python: any iterable of feed dicts, or an object with ``get_next()`` (onnxruntime's reader protocol).

Keys starting with ``__`` are not inputs: ``__label__`` holds labels for task metrics.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .errors import BadInputError

__all__ = ["FeedData", "load_feeds", "load_function", "InputSpec", "input_specs", "LABEL_KEY", "Sample"]

LABEL_KEY = "__label__"


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple  # ints, strings (dim params) or None


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The model's real inputs (initializers listed as inputs in IR < 4 are excluded)."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits or not vi.type.HasField("tensor_type"):
            continue
        tt = vi.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type) if tt.elem_type else np.dtype(np.float32)
        shape: tuple = ()
        if tt.HasField("shape"):
            shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
        else:
            shape = None  # type: ignore[assignment]
        specs.append(InputSpec(vi.name, np.dtype(dtype), shape))
    return specs


@dataclass
class Sample:
    feeds: dict[str, np.ndarray]
    meta: dict[str, np.ndarray]
    origin: str


class FeedData:
    """A re-iterable stream of feed dicts, validated against a model's inputs when one is given."""

    def __init__(
        self,
        make_iter: Callable[[], Iterator[tuple[dict[str, Any], str]]],
        description: str,
        count: int | None = None,
        inputs: list[InputSpec] | None = None,
    ):
        self._make_iter = make_iter
        self.description = description
        self.count = count
        self.inputs = inputs

    def bind(self, model: onnx.ModelProto) -> FeedData:
        """The same data, checked against this model's input names, dtypes and ranks."""
        return FeedData(self._make_iter, self.description, self.count, input_specs(model))

    def check_first(self) -> FeedData:
        """Validate the first feed now, so bad data fails before any long work starts."""
        for _ in self.samples():
            break
        else:
            raise BadInputError(f"{self.description} holds no feed dicts; give at least one")
        return self

    def samples(self) -> Iterator[Sample]:
        for raw, origin in self._make_iter():
            if not isinstance(raw, dict):
                raise BadInputError(
                    f"{origin}: expected a dict of input name -> array, got {type(raw).__name__}; "
                    "return feed dicts such as {'input': np.ndarray}"
                )
            feeds = {k: np.asarray(v) for k, v in raw.items() if not str(k).startswith("__")}
            meta = {k: np.asarray(v) for k, v in raw.items() if str(k).startswith("__")}
            if self.inputs is not None:
                _validate(feeds, self.inputs, origin)
            yield Sample(feeds, meta, origin)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for s in self.samples():
            yield s.feeds

    def __len__(self) -> int:
        if self.count is None:
            self.count = sum(1 for _ in self._make_iter())
        return self.count

    def __repr__(self) -> str:
        return f"FeedData({self.description})"


def _validate(feeds: dict[str, np.ndarray], specs: list[InputSpec], origin: str) -> None:
    names = {s.name for s in specs}
    unknown = sorted(set(feeds) - names)
    if unknown:
        raise BadInputError(
            f"{origin}: key(s) {', '.join(unknown)} are not inputs of the model (its inputs: "
            f"{', '.join(sorted(names))}); rename the arrays, or prefix non-input keys with '__'"
        )
    missing = sorted(names - set(feeds))
    if missing:
        raise BadInputError(f"{origin}: missing input(s) {', '.join(missing)}; add them to every feed")
    for s in specs:
        arr = feeds[s.name]
        if arr.dtype != s.dtype:
            raise BadInputError(
                f"{origin}: input '{s.name}' has dtype {arr.dtype}, the model expects {s.dtype}; "
                f"save it with .astype(np.{s.dtype.name})"
            )
        if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
            bad = int(arr.size - np.isfinite(arr).sum())
            raise BadInputError(
                f"{origin}: input '{s.name}' holds {bad} NaN/Inf value(s) of {arr.size}; statistics and metrics "
                "on them mean nothing: fix or drop this sample"
            )
        if s.shape is None:
            continue
        if arr.ndim != len(s.shape):
            raise BadInputError(
                f"{origin}: input '{s.name}' has shape {list(arr.shape)} (rank {arr.ndim}), the model expects "
                f"rank {len(s.shape)} {list(s.shape)}"
            )
        for i, (got, want) in enumerate(zip(arr.shape, s.shape)):
            if isinstance(want, int) and want > 0 and got != want:
                raise BadInputError(
                    f"{origin}: input '{s.name}' has shape {list(arr.shape)}, the model expects {list(s.shape)} "
                    f"(dim {i} must be {want})"
                )


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if path.is_file() and not zipfile.is_zipfile(path):
        # np.load would try it as a pickle and blame pickled data: say what it really is
        raise BadInputError(f"{path} is not a readable .npz file (not a zip archive); write it with numpy.savez")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise BadInputError(f"{path} is not a readable .npz file ({e}); write it with numpy.savez") from e


def load_function(spec: str, what: str, signature: str) -> Callable:
    """The function named by ``script.py:function`` (data sources, user metrics)."""
    script, _, func = str(spec).rpartition(":")
    path = Path(script)
    if not script or not path.exists():
        raise BadInputError(f"{what} script not found: {script or spec}; give script.py:function")
    mod_name = f"_onnxslim_{what}_{abs(hash(str(path.resolve())))}"
    loader = importlib.util.spec_from_file_location(mod_name, path)
    if loader is None or loader.loader is None:
        raise BadInputError(f"cannot import {path} as a Python module; give a .py file")
    module = importlib.util.module_from_spec(loader)
    sys.modules[mod_name] = module
    try:
        loader.loader.exec_module(module)
    except Exception as e:
        raise BadInputError(f"importing {path} failed: {type(e).__name__}: {e}") from e
    fn = getattr(module, func, None)
    if not callable(fn):
        raise BadInputError(f"{path} has no function '{func}'; define def {func}{signature}")
    return fn


def _from_script(spec: str) -> FeedData:
    fn = load_function(spec, "data", "(): return [feed dicts]")

    def gen():
        try:
            items = fn()
        except Exception as e:
            raise BadInputError(f"{spec} raised {type(e).__name__}: {e}") from e
        for i, item in enumerate(_iterate(items, spec)):
            yield item, f"{spec}[{i}]"

    return FeedData(gen, f"script {spec}")


def _iterate(obj: Any, where: str) -> Iterator[Any]:
    if hasattr(obj, "get_next") and not isinstance(obj, dict):
        while True:
            item = obj.get_next()
            if item is None:
                return
            yield item
    elif isinstance(obj, dict):
        yield obj
    elif isinstance(obj, Iterable):
        yield from obj
    else:
        raise BadInputError(f"{where} gave a {type(obj).__name__}; give an iterable of feed dicts")


def load_feeds(source: Any) -> FeedData:
    """Feed data from a path spec, an iterable of dicts, a dict, a get_next() reader, or FeedData."""
    if isinstance(source, FeedData):
        return source
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        path = Path(text)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix == ".npz")
            if not files:
                raise BadInputError(f"{path} has no .npz files; put one feed dict per .npz file there")
            return FeedData(
                lambda: ((_read_npz(f), str(f)) for f in files), f"directory {path} ({len(files)} files)", len(files)
            )
        if path.suffix == ".npz":
            if not path.exists():
                raise BadInputError(f"data file not found: {path}")
            return FeedData(lambda: iter([(_read_npz(path), str(path))]), f"file {path}", 1)
        if ".py:" in text:
            return _from_script(text)
        if not path.exists():
            raise BadInputError(
                f"data not found: {text}; give a directory of .npz files, a .npz file, or script.py:function"
            )
        raise BadInputError(
            f"{text}: unsupported data format; give a directory of .npz files, a .npz file, or script.py:function"
        )
    if isinstance(source, dict):
        return FeedData(lambda: iter([(source, "feed dict")]), "one feed dict", 1)
    if hasattr(source, "get_next"):
        cache: list = []
        consumed = [False]

        def reader():
            # A reader is one-shot: remember what it gave so the data can be iterated again.
            if consumed[0]:
                yield from ((c, f"reader[{i}]") for i, c in enumerate(cache))
                return
            for i, item in enumerate(_iterate(source, "reader")):
                cache.append(item)
                yield item, f"reader[{i}]"
            consumed[0] = True

        return FeedData(reader, f"reader {type(source).__name__}")
    if isinstance(source, Iterable):
        items = source if isinstance(source, (list, tuple)) else list(source)
        return FeedData(
            lambda: ((x, f"feeds[{i}]") for i, x in enumerate(items)), f"{len(items)} feed dicts", len(items)
        )
    raise BadInputError(f"unsupported data source {type(source).__name__}; give a path, feed dicts or a reader")
