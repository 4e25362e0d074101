"""Helpers to check that a pass keeps its contract — for built-in and third-party passes alike.

``check_pass_contract(pass_, model, feeds)`` runs the pass through the real pipeline and asserts:
the result passes onnx.checker; the model's contract (I/O names, dtypes, dim params, opsets, metadata)
is kept; ``modified`` tells the truth (an unmodified graph exports the same nodes); outputs match the
original under onnxruntime with its graph optimizations disabled (close within rtol/atol for exact passes;
for lossy ones, within the metric floors the pass declares, judged by ``onnxslim.check`` in lossy mode); and a
second run changes nothing when the pass claims idempotence. The model may be a sample model's path and the
feeds its data folder.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import onnx

from .data import load_feeds
from .graph import ModelContract, check_model, load_model
from .gs_bridge import export_graph, graph_signature, import_graph, value_types
from .parity import check
from .pass_base import Pass, PassContext
from .pipeline import optimize
from .runtime import make_session

__all__ = ["run_model", "assert_outputs_close", "check_pass_contract", "outputs_close"]


def run_model(model: onnx.ModelProto | str, feeds: Mapping[str, np.ndarray], provider: str = "cpu") -> list[Any]:
    """Outputs of one run in onnxruntime with graph optimizations disabled (the reference runner)."""
    info = make_session(model, provider, optimize=False)
    return info.session.run(None, dict(feeds))


def outputs_close(a: Any, b: Any, rtol: float = 0.0, atol: float = 0.0) -> bool:
    """Recursive comparison of ORT outputs (tensors, sequences, maps); NaNs compare equal."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.dtype.kind in "fc" and (rtol or atol):
            return bool(np.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True))
        if a.dtype.kind in "fc":
            return bool(np.array_equal(a, b, equal_nan=True))
        return bool(np.array_equal(a, b))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(outputs_close(x, y, rtol, atol) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(outputs_close(a[k], b[k], rtol, atol) for k in a)
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (np.isnan(a) and np.isnan(b)) or abs(a - b) <= atol + rtol * abs(b)
    return a == b


def assert_outputs_close(
    expected: list[Any], actual: list[Any], names: list[str] | None = None, rtol: float = 0.0, atol: float = 0.0
) -> None:
    assert len(expected) == len(actual), f"{len(expected)} outputs expected, got {len(actual)}"
    for i, (e, a) in enumerate(zip(expected, actual)):
        if not outputs_close(e, a, rtol, atol):
            label = names[i] if names else f"#{i}"
            detail = ""
            if isinstance(e, np.ndarray) and isinstance(a, np.ndarray) and e.shape == a.shape and e.dtype.kind in "fc":
                detail = f": max abs diff {float(np.nanmax(np.abs(e.astype(np.float64) - a))):.3g}"
            raise AssertionError(f"output {label} differs (rtol={rtol}, atol={atol}){detail}")


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def check_pass_contract(
    pass_: Pass,
    model: onnx.ModelProto | str | os.PathLike,
    feeds: Iterable[Mapping[str, np.ndarray]] | Any,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    calibration: Any = None,
    expect_modified: bool | None = None,
    metric_floors: Mapping[str, float] | None = None,
) -> onnx.ModelProto:
    """Run ``pass_`` on ``model`` alone and assert it keeps its contract. Returns the optimized model.

    ``model`` may be a path (a sample model) and ``feeds``/``calibration`` anything ``load_feeds`` takes (a
    folder of .npz files, with ``__label__`` for task metrics). Exact passes are held to ``rtol``/``atol``
    (default 1e-5 / 1e-6: float reassociation) on every feed; lossy ones (``exact = False``) to the metric
    floors they declare (``metric_floors`` overrides them), judged by ``onnxslim.check`` in lossy mode on
    ``feeds``: output cosine, and the accuracy drop when the feeds carry labels; or, when ``rtol``/``atol``
    are given, to those on every feed.
    """
    source = model
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    check_model(model, full=True)
    out, report = optimize(
        model, [pass_], calibration=calibration, on_pass_error="raise", fixed_point=False, shape_annotations="all"
    )
    check_model(out, full=True)
    problems = ModelContract.of(model).differences(out)
    assert not problems, f"{pass_.name} broke the model's contract: {problems}"
    record = report.passes[0]
    if expect_modified is not None:
        assert record.modified == expect_modified, (
            f"{pass_.name}: modified={record.modified}, expected {expect_modified}"
        )
    if not record.modified:
        # The pipeline hands back the input when the graph is unchanged, so look at the pass's raw result.
        loaded = load_model(model)
        graph = import_graph(loaded)
        fresh = type(pass_)(**pass_.options_dict())
        fresh.run(
            PassContext(
                graph=graph,
                opset=_opset(model),
                base_dir=loaded.base_dir,
                calibration=load_feeds(calibration) if calibration is not None else None,
            )
        )
        raw = export_graph(graph, loaded.contract, value_types(loaded.proto))
        untouched = export_graph(import_graph(load_model(model)), loaded.contract, value_types(loaded.proto))
        assert graph_signature(raw) == graph_signature(untouched), (
            f"{pass_.name} reported modified=False but changed the graph"
        )
    if pass_.exact or rtol is not None or atol is not None:
        rtol, atol = (1e-5 if rtol is None else rtol), (1e-6 if atol is None else atol)
        names = [o.name for o in model.graph.output]
        for feed in load_feeds(feeds):
            feed = {k: v for k, v in feed.items() if not str(k).startswith("__")}
            assert_outputs_close(run_model(model, feed), run_model(out, feed), names, rtol, atol)
    else:
        floors = dict(metric_floors if metric_floors is not None else pass_.metric_floors)
        parity = check(model, out, data=feeds, mode="lossy", metric_floors=floors)
        assert parity.passed, f"{pass_.name} misses its declared floors {floors} on {source!r}: " + "; ".join(
            parity.failures
        )
    if pass_.idempotent:
        again, rep2 = optimize(
            out,
            [type(pass_)(**pass_.options_dict())],
            calibration=calibration,
            on_pass_error="raise",
            fixed_point=False,
            shape_annotations="all",
        )
        assert not rep2.passes[0].modified, f"{pass_.name} claims idempotence but modified its own output again"
    return out
