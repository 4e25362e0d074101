"""Saving a model atomically, with its external data streamed and the pair always consistent.

``save_model`` writes the data file under a temporary name, renames it to a name no current file has
(``OUT.data``, or ``OUT.<content hash>.data`` when that exists), fsyncs the folder, renames the model that points
at it into place, and only then removes the old data file, so a kill at any step leaves the old pair or the new
one; the next save into the same folder removes a dead writer's temporary files. ``check_writable`` is the
pre-flight check of an output folder; ``external_locations`` the data files a saved model reads.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path

import onnx
from onnx import TensorProto

from .errors import BadInputError
from .graph import (
    _COPY_CHUNK,
    PROTOBUF_LIMIT,
    _external_info,
    _is_external,
    external_path,
    iter_tensor_protos,
    read_external,
    tensor_nbytes,
)

__all__ = ["save_model", "stage_model", "StagedModel", "check_writable", "external_locations"]

log = logging.getLogger(__name__)


def _serialized_size_estimate(model: onnx.ModelProto, *, include_external: bool = False) -> int:
    tensors = iter_tensor_protos(model)
    return sum(tensor_nbytes(t) for t in tensors if include_external or not _is_external(t)) + 2**20


_TMP_SUFFIX = ".tmp-onnxslim"
# Temp files are named .<target>.<pid>.<random>.tmp-onnxslim, so a later run can tell a dead writer's leftovers.
_TMP_NAME = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)\.[^.]+" + re.escape(_TMP_SUFFIX) + "$")
_OLD_MODEL_PARSE_LIMIT = 256 * 2**20


def _atomic_target(path: Path) -> Path:
    """A temporary file next to ``path``, with the permissions a plain ``open(path, "w")`` would give it (an
    existing file's mode; else 0666 minus the umask): mkstemp makes 0600 files, and a model only its writer
    can read breaks serving setups."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=_TMP_SUFFIX, dir=str(path.parent))
    try:
        if path.exists():
            mode = path.stat().st_mode & 0o7777
        else:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    return Path(tmp)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _remove_stale_temps(folder: Path) -> None:
    """Delete temp files a killed writer left in ``folder`` (only of our naming, only of dead processes)."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for e in entries:
        m = _TMP_NAME.match(e.name)
        if m and int(m["pid"]) != os.getpid() and not _pid_alive(int(m["pid"])):
            try:
                os.unlink(e.path)
                log.info("removed %s, left by a killed run", e.path)
            except OSError:
                pass


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _data_name_pattern(name: str) -> re.Pattern:
    return re.compile(rf"^{re.escape(name)}\.[0-9a-f]{{16}}\.data$")


def external_locations(path: str | os.PathLike) -> set[str]:
    """External-data locations of the model at ``path`` (empty when unreadable or too big to parse cheaply)."""
    path = Path(path)
    try:
        if not path.is_file() or path.stat().st_size > _OLD_MODEL_PARSE_LIMIT:
            return set()
        old = onnx.load(str(path), load_external_data=False)
        return {_external_info(t).get("location", "") for t in iter_tensor_protos(old) if _is_external(t)}
    except Exception:  # noqa: BLE001 - an unreadable old model just has nothing to clean up
        return set()


def _writable_folder(folder: Path, what: str) -> None:
    """Fail now, with one line, when nothing can be created in ``folder`` (root ignores mode bits: try it)."""
    if not folder.is_dir():
        raise BadInputError(f"{what} folder {folder} does not exist; create it first")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".onnxslim-probe.{os.getpid()}.", suffix=_TMP_SUFFIX, dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise BadInputError(
            f"cannot write to the {what} folder {folder} ({e.strerror}); choose a writable folder"
        ) from None


def check_writable(path: str | os.PathLike, what: str = "output") -> Path:
    """Pre-flight for an output file: not a directory, its folder exists and is writable."""
    path = Path(path)
    if path.is_dir():
        raise BadInputError(f"{what} path {path} is a directory; give a file name such as {path / 'model.onnx'}")
    _writable_folder(path.parent if str(path.parent) else Path("."), what)
    return path


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    source_dir: Path | None = None,
    external_data: bool | None = None,
    size_threshold: int = 1024,
    protect: Iterable[str | os.PathLike] = (),
) -> Path:
    """Write a model atomically. Returns the path written.

    external_data: True writes every tensor of ``size_threshold`` bytes or more to a data file next to the
    output (``<name>.data``, or ``<name>.<content hash>.data`` when ``<name>.data`` already exists); None (auto)
    does so when the model has external tensors already or would not fit in one protobuf; False keeps
    everything inline (fails above 2 GB with a clear error).
    Tensors already external are streamed from ``source_dir`` without loading them whole.

    The model/data pair is replaced so that a crash at any moment leaves the old pair or the new one: the new
    data file never takes the name of a file the old model (or anything in ``protect``, e.g. the input
    model's files) reads; it is renamed into place before the model that points at it, and the old data file
    is removed only after. The model proto is restored to its original state before returning.
    """
    return stage_model(
        model, path, source_dir=source_dir, external_data=external_data, size_threshold=size_threshold, protect=protect
    ).commit()


class StagedModel:
    """A written but not yet published model: ``path`` is a complete model file next to the target (its data
    already under its final name), so it can be loaded and checked; ``commit()`` renames it into place and
    removes the old data file, ``discard()`` removes what was written and leaves the old pair untouched."""

    def __init__(self, target: Path, path: Path, location: str | None, old: set[str], keep: set[str], fresh: bool):
        self.target, self.path = target, path
        self._location, self._old, self._keep, self._fresh = location, old, keep, fresh
        self._done = False

    def commit(self) -> Path:
        if self._done:
            raise RuntimeError("this staged model was already committed or discarded")
        self._done = True
        folder, path = self.target.parent, self.target
        try:
            os.replace(self.path, path)
            _fsync_dir(folder)
        except OSError as e:
            self._remove_written()
            raise BadInputError(
                f"cannot write {path} ({e.strerror or e}); check the folder's space and permissions"
            ) from e
        # The new pair is in place: the old data file goes now (only names of our making, never a protected file).
        ours = _data_name_pattern(path.name)
        plain = f"{path.name}.data"
        stale = {loc for loc in self._old if loc == plain or ours.match(loc)}
        try:
            stale.update(e.name for e in os.scandir(folder) if ours.match(e.name))
        except OSError:
            pass
        for loc in stale - {self._location}:
            f = folder / loc
            if os.path.realpath(f) not in self._keep and f.is_file():
                try:
                    f.unlink()
                except OSError:
                    pass
        return path

    def discard(self) -> None:
        if self._done:
            return
        self._done = True
        self._remove_written()

    def _remove_written(self) -> None:
        victims = [self.path]
        if self._fresh and self._location:  # a data file this write created (never one the old model reads)
            victims.append(self.target.parent / self._location)
        for f in victims:
            try:
                f.unlink()
            except OSError:
                pass


def stage_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    source_dir: Path | None = None,
    external_data: bool | None = None,
    size_threshold: int = 1024,
    protect: Iterable[str | os.PathLike] = (),
) -> StagedModel:
    """The first half of ``save_model``: everything written and durable, nothing published yet."""
    path = Path(path)
    check_writable(path)
    folder = path.parent
    has_ext = any(_is_external(t) for t in iter_tensor_protos(model))
    too_big = _serialized_size_estimate(model, include_external=True) >= PROTOBUF_LIMIT
    if external_data is None:
        external_data = has_ext or too_big
    if not external_data and too_big:
        raise BadInputError(
            f"the model's weights exceed protobuf's 2 GB limit; save with external data (--external-data) to {path}"
        )
    plain = f"{path.name}.data"
    _remove_stale_temps(folder)
    keep = {os.path.realpath(p) for p in protect}
    if source_dir is not None:
        for t in iter_tensor_protos(model):
            if _is_external(t):
                keep.add(str(external_path(source_dir, _external_info(t).get("location", ""), t.name)))
    if os.path.realpath(path) in keep:
        raise BadInputError(f"the output {path} is a file the input model reads; choose another output path")
    old = external_locations(path)
    undo: list[tuple[TensorProto, TensorProto]] = []
    tmp_model: Path | None = None
    tmp_data: Path | None = None
    location: str | None = None
    fresh = False
    try:
        tmp_model = _atomic_target(path)
        if external_data:
            tmp_data = _atomic_target(folder / plain)
            digest = _write_external(model, tmp_data, source_dir, size_threshold, undo)
            location = plain if not (folder / plain).exists() else f"{path.name}.{digest[:16]}.data"
            for t, _ in undo:
                for e in t.external_data:
                    if e.key == "location":
                        e.value = location
        elif has_ext:
            for t in iter_tensor_protos(model):
                if _is_external(t):
                    undo.append((t, _snapshot(t)))
                    raw = read_external(t, source_dir)
                    t.ClearField("external_data")
                    t.data_location = TensorProto.DEFAULT
                    t.raw_data = raw
        with open(tmp_model, "wb") as f:
            f.write(model.SerializeToString())
            f.flush()
            os.fsync(f.fileno())
        if tmp_data is not None:
            target = folder / location
            if os.path.realpath(target) in keep or location in old:  # same name means same bytes (content hash)
                tmp_data.unlink()
            else:
                os.replace(tmp_data, target)
                fresh = True
            tmp_data = None
            _fsync_dir(folder)  # the data is durable under its final name before the model points at it
        staged = StagedModel(path, tmp_model, location, old, keep, fresh)
        tmp_model = None
        return staged
    except OSError as e:
        raise BadInputError(f"cannot write {path} ({e.strerror or e}); check the folder's space and permissions") from e
    finally:
        for t, snap in reversed(undo):
            t.CopyFrom(snap)
        for leftover in (tmp_model, tmp_data):
            if leftover is not None and leftover.exists():
                leftover.unlink()


def _snapshot(t: TensorProto) -> TensorProto:
    snap = TensorProto()
    snap.CopyFrom(t)
    return snap


def _write_external(model, data_path: Path, source_dir, threshold: int, undo) -> str:
    """Stream tensors into ``data_path``; returns the hash of its bytes (callers set the location after)."""
    offset = 0
    digest = hashlib.blake2b(digest_size=16)
    with open(data_path, "wb") as out:
        for t in iter_tensor_protos(model, constants=False):
            ext = _is_external(t)
            if not ext and (tensor_nbytes(t) < threshold or t.data_type == TensorProto.STRING):
                continue
            undo.append((t, _snapshot(t)))
            pad = (-offset) % 4096  # page-aligned so runtimes can mmap
            out.write(b"\0" * pad)
            digest.update(b"\0" * pad)
            offset += pad
            start = offset
            if ext:
                info = _external_info(t)
                if source_dir is None:
                    raise BadInputError(f"tensor '{t.name}' is external but its source folder is unknown")
                length = int(info["length"]) if "length" in info else tensor_nbytes(t)
                with open(external_path(source_dir, info.get("location", ""), t.name), "rb") as src:
                    src.seek(int(info.get("offset", 0)))
                    left = length
                    while left:
                        chunk = src.read(min(left, _COPY_CHUNK))
                        if not chunk:
                            raise BadInputError(f"external data for '{t.name}' is truncated; copy the data file again")
                        out.write(chunk)
                        digest.update(chunk)
                        left -= len(chunk)
            else:
                raw = t.raw_data if t.HasField("raw_data") else onnx.numpy_helper.to_array(t).tobytes()
                out.write(raw)
                digest.update(raw)
                length = len(raw)
                for fld in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "raw_data"):
                    t.ClearField(fld)
            offset += length
            del t.external_data[:]
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", ""), ("offset", str(start)), ("length", str(length))):
                t.external_data.add(key=k, value=v)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest()
