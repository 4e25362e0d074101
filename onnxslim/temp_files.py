"""Private temporary folders that a killed run does not leave behind for good.

Each folder (``onnxslim-<kind>.<pid>.<random>`` in the system temp folder) holds an exclusive ``flock`` on a
lock file inside it for as long as its owner lives; the kernel drops that lock when the owner dies, even by
SIGKILL. ``remove_stale_temp_dirs`` deletes the folders whose lock it can take, so a later run cleans up after
a killed one without guessing from pids (which other containers sharing /tmp may reuse) or ages.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: folders are still removed on a normal exit
    fcntl = None  # type: ignore[assignment]

__all__ = ["private_temp_dir", "remove_stale_temp_dirs"]

log = logging.getLogger(__name__)

PREFIX = "onnxslim-"
_LOCK = ".onnxslim-lock"


@contextlib.contextmanager
def private_temp_dir(kind: str, root: str | os.PathLike | None = None) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{kind}.{os.getpid()}.", dir=root))
    fd = os.open(path / _LOCK, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)


def remove_stale_temp_dirs(root: str | os.PathLike | None = None) -> int:
    """Delete our temp folders whose owner is gone; returns how many. Never touches a live run's folder."""
    if fcntl is None:
        return 0
    root = Path(root) if root is not None else Path(tempfile.gettempdir())
    removed = 0
    try:
        entries = [e for e in os.scandir(root) if e.name.startswith(PREFIX) and e.is_dir(follow_symlinks=False)]
    except OSError:
        return 0
    for e in entries:
        try:
            fd = os.open(os.path.join(e.path, _LOCK), os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            continue  # being created (no lock file yet) or not ours
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its owner is alive
            shutil.rmtree(e.path, ignore_errors=True)
            removed += 1
            log.info("removed %s, left by a killed run", e.path)
        finally:
            os.close(fd)
    return removed
