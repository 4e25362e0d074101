"""Where candidate evaluations run: in this process, in local worker processes, or on a Ray cluster.

An executor has one method, ``map(fn, tasks, on_done)``: results in the order of ``tasks`` whatever the order
they finish in (so a search is deterministic however many workers it has), ``on_done(done, total)`` called as
they arrive. ``fn`` and the tasks must pickle (module-level functions, plain data). Write your own by giving any
object with that method to ``auto_compress(executor=...)``; its ``close()``, if it has one, is called when the
search is done with it.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, Protocol

from ..errors import UsageError

__all__ = ["Executor", "SerialExecutor", "ProcessExecutor", "RayExecutor", "make_executor"]

Done = Callable[[int, int], None] | None


class Executor(Protocol):
    name: str

    def map(self, fn: Callable[[Any], Any], tasks: Sequence[Any], on_done: Done = None) -> list[Any]: ...


class SerialExecutor:
    name = "serial"

    def map(self, fn, tasks, on_done: Done = None) -> list:
        out = []
        for i, t in enumerate(tasks):
            out.append(fn(t))
            if on_done:
                on_done(i + 1, len(tasks))
        return out


class ProcessExecutor:
    """``workers`` local processes (spawned: a forked onnxruntime thread pool is not safe to reuse). The pool
    lives from the first ``map`` to ``close()``: a worker keeps what it built for the search (the task metric's
    reference run, the calibration statistics) from one round of candidates to the next."""

    def __init__(self, workers: int):
        self.workers = max(1, int(workers))
        self.name = f"local ({self.workers} worker processes)"
        self._pool: ProcessPoolExecutor | None = None

    def map(self, fn, tasks, on_done: Done = None) -> list:
        if self.workers == 1 or len(tasks) <= 1 and self._pool is None:
            return SerialExecutor().map(fn, tasks, on_done)
        if self._pool is None:
            ctx = multiprocessing.get_context("spawn")
            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx)
        results: list = [None] * len(tasks)
        futures = {self._pool.submit(fn, t): i for i, t in enumerate(tasks)}
        for done, fut in enumerate(as_completed(futures), 1):
            results[futures[fut]] = fut.result()
            if on_done:
                on_done(done, len(tasks))
        return results

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RayExecutor:
    """Tasks as Ray remote calls. ``address``: None starts a local Ray instance (``num_cpus`` = workers);
    ``"auto"`` or ``"ray://host:port"`` joins a running cluster. Needs ``pip install 'onnxslim[ray]'``."""

    def __init__(self, address: str | None = None, workers: int | None = None):
        try:
            import ray
        except ImportError as e:
            raise UsageError(
                "the ray executor needs Ray: pip install 'onnxslim[ray]' (or choose --auto-executor local)"
            ) from e
        self._ray = ray
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if address:
                kwargs["address"] = address
            elif workers:
                kwargs["num_cpus"] = int(workers)
            ray.init(**kwargs)
        self.name = f"ray ({address or 'local instance'})"

    def map(self, fn, tasks, on_done: Done = None) -> list:
        ray = self._ray
        remote = ray.remote(num_cpus=1)(fn)
        refs = [remote.remote(t) for t in tasks]
        index = {ref: i for i, ref in enumerate(refs)}
        results: list = [None] * len(tasks)
        pending, done = list(refs), 0
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                results[index[ref]] = ray.get(ref)
                done += 1
                if on_done:
                    on_done(done, len(tasks))
        return results


def make_executor(spec: Any = "local", workers: int | None = None) -> Executor:
    """``"local"`` (worker processes; ``workers`` default: this machine's cores), ``"serial"``, ``"ray"`` (a local
    Ray instance), ``"ray:ADDRESS"`` (``ray:auto``, ``ray:ray://host:10001``), or an executor object."""
    if spec is None:
        spec = "local"
    if not isinstance(spec, str):
        if not callable(getattr(spec, "map", None)):
            raise UsageError(f"executor {spec!r} has no map(fn, tasks, on_done) method")
        return spec
    if spec == "serial":
        return SerialExecutor()
    if spec == "local":
        from ..latency import cpu_count

        return ProcessExecutor(workers or cpu_count())
    if spec == "ray" or spec.startswith("ray:"):
        return RayExecutor(spec[4:] or None, workers)
    raise UsageError(f"unknown executor {spec!r}; choose local, serial, ray or ray:ADDRESS")
