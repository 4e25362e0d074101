"""Progress of the CLI's long stages on stderr: a rich bar on a terminal, plain lines in logs and pipes."""

from __future__ import annotations

import sys
import threading
import time

__all__ = ["progress_display", "ProgressLines"]


class progress_display:
    """Progress on stderr, one task per stage: a rich bar on a terminal; elsewhere (CI logs, nohup) plain lines,
    written only for stages that last: a start line once a stage has run ``start_after`` seconds, a progress
    line every ``every`` seconds, and a closing line with its duration. ``quiet`` prints nothing."""

    start_after = 3.0
    every = 10.0

    def __init__(self, quiet: bool = False):
        self.quiet = quiet

    def __enter__(self):
        from rich.console import Console

        console = Console(stderr=True)
        self._bar = self._lines = None
        if self.quiet:
            return None
        if console.is_terminal:
            from rich.progress import Progress

            self._bar = Progress(console=console, transient=True)
            self._tasks: dict[str, int] = {}
            self._bar.__enter__()
            return self._update_bar
        self._lines = ProgressLines(self.start_after, self.every)
        return self._lines.update

    def _update_bar(self, stage: str, done: int, total: int | None) -> None:
        if stage not in self._tasks:
            self._tasks[stage] = self._bar.add_task(stage, total=total)
        finished = total is not None and done >= total
        self._bar.update(self._tasks[stage], completed=done, total=total, visible=not finished)

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)
        if self._lines is not None:
            self._lines.close()
        return False


class ProgressLines:
    """The plain-line reporter. Stages nest (a pass runs calibration, then sensitivity probes): the innermost
    open stage is reported, and when it ends the one around it is again. A daemon thread wakes up each second
    and writes what is due."""

    def __init__(self, start_after: float, every: float):
        self.start_after, self.every = start_after, every
        self._lock = threading.Lock()
        self._open: list[dict] = []  # outermost first
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tick, daemon=True)
        self._thread.start()

    def update(self, stage: str, done: int, total: int | None) -> None:
        with self._lock:
            names = [s["stage"] for s in self._open]
            if stage in names:
                self._close_from(names.index(stage) + 1)  # stages opened inside it are over
                entry = self._open[-1]
            else:
                entry = {"stage": stage, "t0": time.monotonic(), "announced": False, "last": 0.0}
                self._open.append(entry)
            entry["done"], entry["total"] = done, total
            if total is not None and done >= total:
                self._close_from(len(self._open) - 1)

    def _close_from(self, i: int) -> None:
        while len(self._open) > i:
            e = self._open.pop()
            if e["announced"]:
                self._write(f"{e['stage']}: done in {time.monotonic() - e['t0']:.0f}s")

    def _tick(self) -> None:
        while not self._stop.wait(min(1.0, self.start_after, self.every)):
            with self._lock:
                if not self._open:
                    continue
                e, now = self._open[-1], time.monotonic()
                elapsed = now - e["t0"]
                done, total = e.get("done", 0), e.get("total")
                count = f"{done}/{total}" if total else f"{done}"
                if not e["announced"] and elapsed >= self.start_after:
                    e["announced"], e["last"] = True, now
                    self._write(f"{e['stage']}: started ({count} done)")
                elif e["announced"] and now - e["last"] >= self.every:
                    e["last"] = now
                    pct = f" ({100 * done / total:.0f}%)" if total else ""
                    self._write(f"{e['stage']}: {count}{pct}, {elapsed:.0f}s")

    @staticmethod
    def _write(line: str) -> None:
        sys.stderr.write(f"onnxslim: {line}\n")
        sys.stderr.flush()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with self._lock:
            self._close_from(0)
