"""The pipeline: load once, run passes in the order given, check after each, time it, save atomically.

The pipeline owns every cross-cutting concern so passes hold only their rewrite: it never mutates the
caller's model, validates the graph after each pass (a failing pass is rolled back and recorded, or
raised with ``on_pass_error="raise"``), checks pass order against ``requires``, runs exact pipelines to a
fixed point, exports once, puts the model's contract back and runs onnx.checker on the result.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import onnx
import onnx_graphsurgeon as gs

from .calibration_service import CalibrationService
from .data import FeedData, load_feeds
from .errors import BadInputError, OnnxSlimError, PassError, UsageError
from .graph import (
    PROTOBUF_LIMIT,
    LoadedModel,
    ModelContract,
    check_model,
    external_path,
    iter_graphs,
    iter_tensor_protos,
    load_model,
    tensor_nbytes,
)
from .gs_bridge import export_graph, graph_signature, import_graph, quiet_graphsurgeon, value_types
from .model_save import check_writable, external_locations, save_model, stage_model
from .pass_base import Pass, PassContext, PassResult
from .registry import get_pass
from .report import PassRecord, Report
from .summary import summarize
from .temp_files import remove_stale_temp_dirs
from .validate_model import validate_graph, validate_input

__all__ = ["PassSpec", "OptimizeResult", "optimize", "resolve_passes", "DEFAULT_PASSES", "validate_graph"]

log = logging.getLogger(__name__)

# The default lossless pipeline, run to a fixed point. Shapes first (later passes read them), then folding,
# no-op removal, fusions, sharing and CSE (sharing first, so CSE sees equal constants as one), dead code last.
DEFAULT_PASSES: tuple[str, ...] = (
    "infer_shapes",
    "fold_constants",
    "inline_constant_if",
    "fold_shape_computations",
    "eliminate_identity_ops",
    "fuse_pad_into_conv",
    "fuse_batchnorm_into_conv",
    "fuse_bias_add_into_conv",
    "fuse_scale_into_conv",
    "fuse_matmul_add_into_gemm",
    "fuse_layernorm",
    "collapse_reshape_chains",
    "drop_default_rnn_states",
    "share_identical_weights",
    "eliminate_common_subexpressions",
    "eliminate_dead_nodes",
)


@dataclass
class PassSpec:
    """A pass by name with its options: what the CLI and config files produce, and what ``optimize`` takes."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> PassSpec:
        """``name`` or ``name:key=value,key=value`` (values with commas: use ``|`` between list items)."""
        name, _, rest = text.partition(":")
        name = name.strip()
        if not name:
            raise UsageError(f"empty pass name in {text!r}; write name or name:key=value,...")
        options: dict[str, Any] = {}
        for item in filter(None, (p.strip() for p in rest.split(","))):
            key, eq, value = item.partition("=")
            if not eq:
                raise UsageError(f"option {item!r} of pass '{name}' has no value; write {item}=VALUE")
            options[key.strip().replace("-", "_")] = value.strip()
        return cls(name, options)


class OptimizeResult(NamedTuple):
    model: onnx.ModelProto
    report: Report


PassLike = str | PassSpec | Pass | type[Pass] | tuple[str, dict] | dict


def resolve_passes(passes: Iterable[PassLike] | None) -> list[Pass]:
    """Pass instances from names, specs, classes, (name, options) pairs, dicts or instances."""
    if passes is None:
        passes = DEFAULT_PASSES
    out: list[Pass] = []
    for p in passes:
        if isinstance(p, Pass):
            out.append(p)
        elif isinstance(p, type) and issubclass(p, Pass):
            out.append(p())
        elif isinstance(p, PassSpec):
            out.append(get_pass(p.name)(**p.options))
        elif isinstance(p, str):
            spec = PassSpec.parse(p)
            out.append(get_pass(spec.name)(**spec.options))
        elif isinstance(p, tuple) and len(p) == 2:
            out.append(get_pass(p[0])(**dict(p[1])))
        elif isinstance(p, dict) and "name" in p:
            opts = {k: v for k, v in p.items() if k != "name"}
            opts.update(p.get("options", {}) if isinstance(p.get("options"), dict) else {})
            opts.pop("options", None)
            out.append(get_pass(p["name"])(**opts))
        else:
            raise UsageError(f"cannot use {p!r} as a pass; give a name, PassSpec, Pass class or instance")
    _check_order(out)
    return out


def _check_order(passes: Sequence[Pass]) -> None:
    seen: set[str] = set()
    for p in passes:
        for req in p.requires:
            if req not in seen:
                order = " -> ".join(q.name for q in passes)
                raise UsageError(
                    f"pass '{p.name}' requires '{req}' to run before it, but the order given is {order}; "
                    f"put '{req}' earlier"
                )
        seen.add(p.name)
    names = [p.name for p in passes]
    for i, p in enumerate(passes):
        late = [q for q in p.runs_before if q in names[:i]]
        if late:
            order = " -> ".join(names)
            raise UsageError(
                f"pass '{p.name}' must run before '{late[0]}', which rewrites the weights it reads (it would find "
                f"nothing to do after it), but the order given is {order}; put '{p.name}' earlier (the CLI's flags "
                "use channels -> prune -> share -> quantize -> pack)"
            )


def _check_output_path(loaded: LoadedModel, in_path: Path | None, out_path: Path, overwrite_input: bool) -> list[str]:
    """Refuse an output that would overwrite a file the input reads; the files save_model must leave alone."""
    check_writable(out_path)
    reads = [external_path(loaded.base_dir, loc, loc) for loc in loaded.external_files] if loaded.base_dir else []
    out_real = Path(os.path.realpath(out_path))
    for loc, real in zip(loaded.external_files, reads):
        if real == out_real:
            raise BadInputError(
                f"the output {out_path} is the external data file '{loc}' the input model reads; "
                "choose another output path"
            )
    if in_path is not None and out_real == Path(os.path.realpath(in_path)) and overwrite_input:
        return []  # replacing the input itself: its old data file goes once the new pair is in place
    return [str(p) for p in reads] + ([str(in_path)] if in_path is not None else [])


# --------------------------------------------------------------------------------------------- running
def _run_pass(
    p: Pass, ctx: PassContext, before: list[str], iteration: int, on_error: str, verify=None
) -> tuple[PassRecord, gs.Graph]:
    record = PassRecord(p.name, p.options_dict(), p.exact, iteration=iteration)
    ctx = ctx.for_graph(ctx.graph)  # per-run state (fresh names) starts empty for every pass run
    snapshot = ctx.graph.copy() if on_error == "rollback" else None
    t0 = time.perf_counter()
    try:
        result = p.run(ctx)
        if not isinstance(result, PassResult):
            raise TypeError(f"run() returned {type(result).__name__}; return a PassResult")
        validate_graph(ctx.graph)
        if verify is not None and result.modified:
            verify(ctx.graph)
    except OnnxSlimError:
        raise
    except Exception as e:
        record.seconds = time.perf_counter() - t0
        err = PassError(p.name, f"{type(e).__name__}: {e}", before=before)
        if snapshot is None:
            raise err from e
        log.warning("%s; its changes were rolled back", err)
        log.debug("traceback", exc_info=True)
        record.error = f"{type(e).__name__}: {e}"
        return record, snapshot
    record.seconds = time.perf_counter() - t0
    record.modified = bool(result.modified)
    record.stats = dict(result.stats)
    record.skipped = [s.to_dict() for s in result.skipped]
    record.notes = list(result.notes)
    record.layers = [dict(d) for d in result.layers]
    log.info("%s: modified=%s %s (%.3fs)", p.name, record.modified, record.stats, record.seconds)
    return record, ctx.graph


def _file_size(path: Path | None, loaded: LoadedModel | None = None) -> int | None:
    if path is None or not path.exists():
        return None
    size = path.stat().st_size
    files = loaded.external_files if loaded is not None else []
    for f in files:
        p = path.parent / f
        if p.exists():
            size += p.stat().st_size
    return size


def _input_check_level(loaded: LoadedModel) -> str:
    """The strictest onnx.checker level the input passes; the output is held to the same level."""
    for full in (True, False):
        try:
            if loaded.path is not None and (loaded.has_external_data or loaded.file_size >= PROTOBUF_LIMIT):
                check_model(loaded.path, full=full)
            else:
                check_model(loaded.proto, full=full)
            return "full" if full else "basic"
        except Exception as e:  # noqa: BLE001 - the checker raises several types
            last = e
    log.warning("the input model fails onnx.checker (%s); the output is not checked", str(last).splitlines()[0])
    return "none"


def optimize(
    model: str | os.PathLike | onnx.ModelProto,
    passes: Iterable[PassLike] | None = None,
    *,
    output: str | os.PathLike | None = None,
    calibration: Any = None,
    fixed_point: bool | None = None,
    max_iterations: int = 10,
    check: Literal["auto", "full", "basic", "none"] = "auto",
    on_pass_error: Literal["rollback", "raise"] = "rollback",
    external_data: bool | None = None,
    overwrite_input: bool = False,
    shape_annotations: Literal["keep", "all"] = "keep",
    seed: int = 0,
    opset: int | None = None,
    progress: Callable[[str, int, int | None], None] | None = None,
    gate: Callable[[Path, Report], bool] | None = None,
    latency: bool = False,
    latency_data: Any = None,
    statistics: CalibrationService | None = None,
) -> OptimizeResult:
    """Run passes on a model and return ``(model, report)``; write it to ``output`` when given.

    passes: names (``"fold_constants"``, ``"fold_constants:size_threshold=4096"``), PassSpec, Pass classes or
    instances; None runs the default lossless pipeline. calibration: anything ``load_feeds`` accepts.
    fixed_point: repeat the list until no pass modifies the graph (default: when every pass is exact).
    check: onnx.checker level for the result; "auto" uses the strictest level the input passes.
    shape_annotations: "keep" writes value_info only for tensors the input annotated (shapes inferred on the
    way help the passes but would make the file bigger); "all" writes every inferred annotation.
    progress: ``progress(stage, done, total)`` for long stages inside passes (calibration runs); total may be None.
    opset: raise the model's default-domain opset to this version first (onnx.version_converter), e.g. 13 so
    int8 weights get per-channel scales; the output then imports that opset. This changes the model's
    contract, so it happens only when asked, and the report says so.
    gate: ``gate(staged_path, report) -> passed``, run on the complete written result before it replaces ``output``
    (e.g. a parity check). Passed: the result is published at ``output``. Failed: ``output`` is left as it was
    and the result is written to ``failed_output_path(output)`` instead (``report.output`` says where). If the
    gate raises, nothing is written.
    latency: measure onnxruntime CPU latency of the input and of the written result (same session options,
    interleaved runs, bounded to a few seconds; see ``onnxslim.latency``) into ``report.latency``; only when
    ``output`` is given and a pass changed the model. Informational: a failed measurement is a reason, never
    an error. latency_data: feeds to time with when there is no calibration data (e.g. the check data);
    without either, one seeded synthetic feed.
    statistics: the ``CalibrationService`` that answers the passes' statistics requests, to share across calls
    over the same calibration data (its answers are cached by model state: many variants of one model built in
    turn reuse what was collected on it); default a fresh one over ``calibration``.
    """
    t_start = time.perf_counter()
    remove_stale_temp_dirs()  # what a killed run left in the temp folder
    pass_list = resolve_passes(passes)
    in_path = Path(model) if isinstance(model, (str, os.PathLike)) else None
    out_path = Path(output) if output is not None else None
    if (
        in_path is not None
        and out_path is not None
        and out_path.exists()
        and in_path.exists()
        and os.path.samefile(in_path, out_path)
        and not overwrite_input
    ):
        raise UsageError(
            f"the output {out_path} is the input model; choose another output path or pass "
            "overwrite_input=True (--overwrite-input) to replace it"
        )
    feeds: FeedData | None = None
    needing = [p.name for p in pass_list if p.needs_calibration]
    loaded = load_model(model)
    protect = _check_output_path(loaded, in_path, out_path, overwrite_input) if out_path is not None else []
    graph, validated = validate_input(loaded), loaded
    if calibration is not None:
        feeds = load_feeds(calibration).bind(loaded.proto).check_first()
    elif needing:
        raise UsageError(f"pass(es) {', '.join(needing)} need calibration data; give --calib DIR (or calibration=...)")

    report = Report(
        input=str(in_path) if in_path else None,
        output=str(out_path) if out_path else None,
        seed=seed,
        calibration=feeds.description if feeds else None,
        versions=_versions(),
    )
    report.before = summarize(loaded.proto, _file_size(in_path, loaded))
    if opset is not None:
        loaded = _raise_opset(loaded, opset, report)
    contract = ModelContract.of(loaded.proto)
    level = _input_check_level(loaded) if check == "auto" else check

    if fixed_point is None:
        fixed_point = all(p.exact for p in pass_list)
    run = dict(
        loaded=loaded,
        pass_list=pass_list,
        feeds=feeds,
        seed=seed,
        fixed_point=fixed_point,
        max_iterations=max_iterations,
        on_pass_error=on_pass_error,
        progress=progress,
        statistics=statistics,
    )
    records, ran, graph = _run_passes(**run, graph=graph if run["loaded"] is validated else None)
    try:
        out = _export(graph, loaded, contract, records, shape_annotations)
    except Exception as e:
        if level != "none":
            raise
        # The input already fails onnx.checker (e.g. an attribute whose type and data disagree): bad input.
        raise BadInputError(
            f"{loaded.path or 'the model'} fails onnx.checker and cannot be rewritten "
            f"({str(e).splitlines()[0][:200]}); fix or re-export it"
        ) from None
    problems = contract.differences(out)
    if problems:
        raise PassError(None, "the model's contract changed: " + "; ".join(problems), before=ran)
    small = not loaded.has_external_data and sum(tensor_nbytes(t) for t in iter_tensor_protos(out)) < PROTOBUF_LIMIT
    checked = False
    if level != "none" and small and on_pass_error == "rollback":
        try:
            _check_output(out, level, ran)
            checked = True
        except PassError as first:
            # Find the pass that broke the model: run again, checking after every pass, and roll back
            # exactly the changes that fail the checker. Costs time only when this happens.
            log.warning("%s; rerunning with a check after every pass", first)
            records, ran, graph = _run_passes(**run, verify=lambda g: _verify(g, contract, loaded, level))
            out = _export(graph, loaded, contract, records, shape_annotations)
            report.warnings.append(
                f"the first run failed onnx.checker ({level}); passes were rerun with a check "
                "after each, and the failing changes rolled back"
            )
    report.passes = records
    report.warnings.extend(f"pass '{r.name}' failed and was rolled back: {r.error}" for r in records if r.error)
    if level != "none" and small and not checked:
        _check_output(out, level, ran)
    if out_path is not None:
        saving = dict(source_dir=loaded.base_dir, external_data=external_data, protect=protect)
        staged = stage_model(out, out_path, **saving)
        try:
            if level != "none" and not small:
                _check_output(staged.path, level, ran)
            passed = gate(staged.path, report) if gate is not None else True
        except BaseException:
            staged.discard()  # a failed run writes nothing
            raise
        if passed:
            staged.commit()
        else:
            staged.discard()
            out_path = failed_output_path(out_path)
            save_model(out, out_path, **saving)
            report.output = str(out_path)
            report.warnings.append(f"the gate failed: the result was written to {out_path}, not to {output}")
        after = summarize(out)
        written = LoadedModel(out, external_files=sorted(external_locations(out_path)))
        after.file_size = _file_size(out_path, written)
        report.after = after
    else:
        report.after = summarize(out)
    if latency:
        report.latency = _latency(model, loaded.proto, out, out_path, records, feeds, latency_data, seed)
    report.checker = f"onnx.checker {level}" if level != "none" else "skipped (the input fails onnx.checker)"
    report.seconds = time.perf_counter() - t_start
    return OptimizeResult(out, report)


def _latency(
    model, proto: onnx.ModelProto, out: onnx.ModelProto, out_path: Path | None, records, feeds, data, seed: int
) -> dict:
    """The latency section: the input model against the written result, or why it was not measured."""
    from .latency import latency_feeds, measure_latency, not_measured

    if out_path is None:
        return not_measured("no output was written (latency is measured on the written file)")
    if not any(r.modified for r in records):
        return not_measured("no pass changed the model, so it runs as the input does")
    try:
        sample, source, desc = latency_feeds(proto, feeds, data, seed)
    except Exception as e:  # noqa: BLE001 - latency is informational
        return not_measured(f"no feeds to time with: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    result = measure_latency(
        model, out_path, sample, seed=seed, feeds_source=source, feeds_description=desc, protos=(proto, out)
    )
    log.info("latency: %s", result.get("reason") or [(s["threads"], s["ratio"]) for s in result["settings"]])
    return result


def failed_output_path(output: str | os.PathLike) -> Path:
    """Where a result that failed its gate goes: ``model.onnx`` -> ``model.failed.onnx``, beside it."""
    p = Path(output)
    return p.with_name(f"{p.stem}.failed{p.suffix or '.onnx'}")


def _raise_opset(loaded: LoadedModel, opset: int, report: Report) -> LoadedModel:
    """The model converted to default-domain ``opset`` (never lowered); the conversion is noted in the report."""
    current = next((o.version for o in loaded.proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise UsageError(f"opset must be an integer opset version such as 13; got {opset!r}")
    if opset < current:
        raise UsageError(
            f"opset={opset} is below the model's opset {current}; onnxslim only raises opsets "
            f"(give {current} or more, or leave it out)"
        )
    if opset == current:
        return loaded
    if loaded.has_external_data or loaded.proto.ByteSize() >= PROTOBUF_LIMIT:
        raise UsageError(
            "raising the opset needs a model held in one file under 2 GB (onnx.version_converter "
            "converts the whole proto); convert it once with onnx.version_converter instead"
        )
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(loaded.proto, opset)
    except Exception as e:  # noqa: BLE001 - the converter raises several types
        raise UsageError(
            f"onnx.version_converter cannot raise this model from opset {current} to {opset}: "
            f"{str(e).splitlines()[0][:200]}; try another opset or convert it yourself"
        ) from e
    report.warnings.append(
        f"opset raised {current} -> {opset} as asked (opset={opset}): the output imports "
        f"ai.onnx {opset}, a change of the model's contract"
    )
    return LoadedModel(
        proto=converted,
        path=loaded.path,
        base_dir=loaded.base_dir,
        file_size=loaded.file_size,
        has_external_data=False,
        external_files=[],
    )


def _keep_annotated_only(model: onnx.ModelProto, original: onnx.ModelProto) -> None:
    annotated = {vi.name for g in iter_graphs(original.graph) for vi in g.value_info}
    for g in iter_graphs(model.graph):
        keep = [vi for vi in g.value_info if vi.name in annotated]
        if len(keep) != len(g.value_info):
            del g.value_info[:]
            g.value_info.extend(keep)


def _run_passes(
    loaded: LoadedModel,
    pass_list: list[Pass],
    feeds,
    seed: int,
    fixed_point: bool,
    max_iterations: int,
    on_pass_error: str,
    verify=None,
    progress=None,
    graph: gs.Graph | None = None,
    statistics: CalibrationService | None = None,
) -> tuple[list[PassRecord], list[str], gs.Graph]:
    graph = graph if graph is not None else import_graph(loaded)
    opset = next((o.version for o in loaded.proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    ctx = PassContext(
        graph=graph,
        opset=opset,
        base_dir=loaded.base_dir,
        calibration=feeds,
        seed=seed,
        progress=progress,
        statistics_service=statistics or CalibrationService(feeds, loaded.base_dir, progress),
        original_model=loaded.proto,
    )
    records: list[PassRecord] = []
    ran: list[str] = []
    failed: set[str] = set()
    for iteration in range(max_iterations if fixed_point else 1):
        changed = False
        for p in pass_list:
            if iteration > 0 and (not p.exact or p.name in failed):
                continue  # lossy passes run once; a pass that failed is not retried
            stage = f"pass {p.name}" + (f" (round {iteration + 1})" if iteration else "")
            if progress:
                progress(stage, 0, 1)
            with quiet_graphsurgeon():
                record, ctx.graph = _run_pass(p, ctx, ran, iteration, on_pass_error, verify)
            if progress:
                progress(stage, 1, 1)
            records.append(record)
            ran.append(p.name)
            changed = changed or record.modified
            if record.error:
                failed.add(p.name)
        if not changed:
            break
    return records, ran, ctx.graph


def _export(
    graph: gs.Graph, loaded: LoadedModel, contract: ModelContract, records: list[PassRecord], shape_annotations: str
) -> onnx.ModelProto:
    with quiet_graphsurgeon():
        graph.toposort(recurse_subgraphs=True)
    out = export_graph(graph, contract, value_types(loaded.proto))
    if shape_annotations == "keep":
        _keep_annotated_only(out, loaded.proto)
    if not any(r.modified for r in records) and graph_signature(out) == graph_signature(loaded.proto):
        out = loaded.proto  # nothing changed: hand back the model exactly as it was, byte for byte
    return out


def _verify(graph: gs.Graph, contract: ModelContract, loaded: LoadedModel, level: str) -> None:
    with quiet_graphsurgeon():
        graph.toposort(recurse_subgraphs=True)
    model = export_graph(graph, contract, value_types(loaded.proto))
    _keep_annotated_only(model, loaded.proto)
    try:
        check_model(model, full=level == "full")
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"the model fails onnx.checker ({level}) after it: {str(e).splitlines()[0][:300]}") from e


def _check_output(target, level: str, ran: list[str]) -> None:
    try:
        check_model(target, full=level == "full")
    except Exception as e:  # noqa: BLE001
        raise PassError(None, f"it fails onnx.checker ({level}): {str(e).splitlines()[0]}", before=ran) from e


def _versions() -> dict[str, str]:
    import numpy

    from ._version import __version__

    out = {
        "onnxslim": __version__,
        "onnx": onnx.__version__,
        "onnx_graphsurgeon": gs.__version__,
        "numpy": numpy.__version__,
    }
    try:
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return out
