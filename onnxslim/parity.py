"""Parity: does the candidate model still give the original's answers, on every provider asked for?

``check(original, candidate, data=...)`` runs both models on each requested execution provider that
really runs (ORT silently falls back to CPU, so the session's providers are checked), compares every
output (metrics in ``parity_metrics``) and gates them with thresholds:

- exact pipelines: ``|c - r| <= atol + rtol*|r|`` on every element, with ``atol`` derived from the model's
  own noise floor (the original run with ORT's graph optimizations on vs off, and run twice on non-CPU
  providers) times ``noise_factor``, floored at ``ulps`` float32 ulps of the output's magnitude;
- lossy pipelines: metric floors declared by the passes (``Pass.metric_floors``) over defaults.

Each provider's run of the original is also compared with the CPU reference ("provider drift"), so a
report separates "the optimization changed the answer" from "this provider computes differently".
Reference runs use ORT with graph optimizations disabled. ``explain=True`` finds the first intermediate
tensor (present in both models by name) where the two diverge.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx

from .data import LABEL_KEY, Sample, load_feeds
from .errors import BadInputError, OnnxSlimError, UsageError
from .graph import load_model
from .lossy_changes import lossy_changes
from .parity_metrics import (
    Threshold,
    channel_axis_for,
    compare_output,
    declared_dims,
    merge_floors,
    parse_channel_axes,
)
from .runtime import available_providers, make_session, node_placement, normalize_provider, run_session
from .synthetic import synthetic_feeds
from .task_metrics import accuracy, find_label_output, load_metric, user_metric

__all__ = ["check", "ParityResult", "Threshold", "DEFAULT_LOSSY_FLOORS"]

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
CPU = "CPUExecutionProvider"
F32_EPS = float(np.finfo(np.float32).eps)
# Used for lossy pipelines whose passes declare no floors of their own.
DEFAULT_LOSSY_FLOORS = {
    "cosine": 0.99,
    "channel_cosine": 0.95,
    "sample_cosine": 0.95,
    "top1_agreement": 0.95,
    "fraction_equal": 0.95,
}
REPORT_VERSION = 1


@dataclass
class ParityResult:
    """Everything a parity check measured; ``to_dict()`` is the JSON report and round-trips via ``from_dict``."""

    passed: bool
    original: str
    candidate: str
    mode: str
    seed: int
    data: dict
    providers: dict
    versions: dict
    runs: list[dict] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    explain: dict | None = None

    @property
    def verdict(self) -> str:
        return "pass" if self.passed else "FAIL"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["verdict"] = self.verdict
        d["report_version"] = REPORT_VERSION
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> ParityResult:
        d = dict(d)
        d.pop("verdict", None)
        d.pop("report_version", None)
        return cls(**d)


# ------------------------------------------------------------------------------------------ helpers
def _versions() -> dict[str, str]:
    import onnxruntime as ort

    from ._version import __version__

    return {"onnxslim": __version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__, "numpy": np.__version__}


def _label_of(model: str | os.PathLike | onnx.ModelProto) -> str:
    return str(model) if isinstance(model, (str, os.PathLike)) else f"<ModelProto {model.graph.name}>"


def _session_source(loaded) -> Any:
    # A path lets ORT find external data next to the model.
    return str(loaded.path) if loaded.path is not None else loaded.proto


def _run_all(
    info,
    samples: list[Sample],
    names: list[str],
    progress: Progress | None,
    stage: str,
) -> list[dict[str, np.ndarray]]:
    outs = []
    for i, s in enumerate(samples):
        try:
            outs.append(run_session(info, s.feeds, names))
        except Exception as e:
            raise BadInputError(f"{stage}: onnxruntime failed on {s.origin}: {str(e).splitlines()[0]}") from e
        if progress:
            progress(stage, i + 1, len(samples))
    return outs


def _noise(a: list[dict[str, np.ndarray]], b: list[dict[str, np.ndarray]], name: str) -> dict[str, float]:
    mx, diff_frac, n = 0.0, 0.0, 0
    for x, y in zip(a, b):
        u, v = x[name], y[name]
        if u.shape != v.shape or u.dtype.kind not in "fiub":
            continue
        d = np.abs(u.astype(np.float64) - v.astype(np.float64))
        d = d[np.isfinite(d)]
        if d.size:
            mx = max(mx, float(d.max()))
            diff_frac += float(np.sum(d > 0))
            n += d.size
    return {"max_abs": mx, "fraction_different": diff_frac / n if n else 0.0}


def _max_ref(outs: list[dict[str, np.ndarray]], name: str) -> float:
    vals = [
        np.abs(o[name][np.isfinite(o[name])]).max()
        for o in outs
        if o[name].dtype.kind == "f" and o[name].size and np.isfinite(o[name]).any()
    ]
    return float(max(vals)) if vals else 0.0


def _default_threshold(
    mode: str,
    floors: dict[str, float],
    dtype: np.dtype,
    noise: dict[str, float],
    max_ref: float,
    noise_factor: float,
    ulps: float,
) -> Threshold:
    if mode == "exact":
        if dtype.kind in "iub":
            frac = max(0.0, 1.0 - noise_factor * noise["fraction_different"])
            return Threshold(fraction_equal=frac, source="exact: integer outputs equal (up to the noise floor)")
        atol = max(noise_factor * noise["max_abs"], ulps * F32_EPS * max(max_ref, 1.0))
        return Threshold(
            atol=atol,
            rtol=ulps * F32_EPS,
            statistic="max",
            source=f"exact: noise floor {noise['max_abs']:.3g} x {noise_factor:g}, floor {ulps:g} ulps",
        )
    keys = (
        ("fraction_equal",)
        if dtype.kind in "iub"
        else ("cosine", "channel_cosine", "sample_cosine", "snr_db", "top1_agreement")
    )
    t = Threshold(source="lossy: declared metric floors")
    return t.updated(
        **{k: floors[k] for k in keys if k in floors},
        **({"accuracy_drop": floors["accuracy_drop"]} if "accuracy_drop" in floors else {}),
    )


def _resolve_thresholds(thresholds, names: list[str]) -> dict[str, Any]:
    """User thresholds: a Threshold (all outputs), or {output or '*': Threshold | {changes}}."""
    if thresholds is None:
        return {}
    if isinstance(thresholds, Threshold):
        return {"*": thresholds}
    unknown = sorted(set(thresholds) - set(names) - {"*"})
    if unknown:
        raise UsageError(f"thresholds name output(s) {', '.join(unknown)}; the outputs are {', '.join(names)}")
    return dict(thresholds)


def _final_threshold(base: Threshold, user: dict[str, Any], name: str) -> Threshold:
    t = base
    for key in ("*", name):
        u = user.get(key)
        if isinstance(u, Threshold):
            t = u
        elif u:
            t = t.updated(**u, source=(t.source + "; " if t.source else "") + f"overridden ({key})")
    return t


# ------------------------------------------------------------------------------------------ check
class _ProviderFailed(Exception):
    """An installed provider that could not create a session, fell back, or failed a run."""


def _provider_runs(src_o, src_c, prov, ref_info, cpu_ref, samples, names, progress):
    """Sessions and outputs of both models on ``prov``; raises _ProviderFailed with the provider's reason."""
    tag = prov.replace("ExecutionProvider", "")
    try:
        s_orig = ref_info if prov == CPU else make_session(src_o, prov)
        s_cand = make_session(src_c, prov)
    except OnnxSlimError as e:
        raise _ProviderFailed(f"session creation failed: {e}") from e
    for s in (s_orig, s_cand):
        if not s.really_on_requested:
            raise _ProviderFailed(
                f"onnxruntime fell back to {s.used[0] if s.used else '?'} (session providers: {', '.join(s.used)})"
            )
    try:
        o_out = cpu_ref if prov == CPU else _run_all(s_orig, samples, names, progress, f"original on {tag}")
        c_out = _run_all(s_cand, samples, names, progress, f"candidate on {tag}")
    except BadInputError as e:
        if prov == CPU:
            raise  # the reference provider failing is the model's problem, not the provider's
        raise _ProviderFailed(str(e)) from e
    return s_orig, s_cand, o_out, c_out


def check(
    original: str | os.PathLike | onnx.ModelProto,
    candidate: str | os.PathLike | onnx.ModelProto,
    data: Any = None,
    *,
    providers: Sequence[str] | str = ("cpu",),
    require_providers: bool = False,
    mode: str = "exact",
    metric_floors: Mapping[str, float] | Sequence[Mapping[str, float]] | None = None,
    thresholds: Threshold | Mapping[str, Threshold | Mapping[str, Any]] | None = None,
    shapes: str | Mapping | None = None,
    synthetic_count: int = 4,
    max_samples: int | None = None,
    seed: int = 0,
    noise_factor: float = 10.0,
    ulps: float = 16.0,
    label_output: str | None = None,
    metric: str | Callable | None = None,
    explain: bool = False,
    explain_samples: int = 2,
    progress: Progress | None = None,
    channel_axes: Mapping[str, int] | str | None = None,
) -> ParityResult:
    """Compare ``candidate`` with ``original`` on ``data`` (None: seeded synthetic inputs).

    mode: "exact" (noise-floor tolerances), "lossy" (metric floors: ``metric_floors`` merged, else
    ``DEFAULT_LOSSY_FLOORS``) or "auto" (lossy when ``lossy_changes`` finds quantization, pruning or codebooks
    in the candidate, else exact; a note says which and why). thresholds override the defaults for every
    output (``"*"``) or by name.
    channel_axes: output name (or ``"*"``) -> the axis whose slices are its channels in the worst-channel
    metrics (also the CLI text ``"boxes:2,*:1"``); default ``default_channel_axis`` of the declared shape.
    ``progress(stage, done, total)`` is called as runs advance. Raises BadInputError/UsageError on bad
    input; a failed gate is ``result.passed == False`` (the caller decides whether to raise).
    """
    if mode not in ("exact", "lossy", "auto"):
        raise UsageError(f"mode must be 'exact', 'lossy' or 'auto', got {mode!r}")
    if isinstance(providers, str):
        providers = [p for p in providers.split(",") if p.strip()]
    wanted: list[str] = []
    for p in providers or ["cpu"]:
        full = normalize_provider(p)
        if full not in wanted:
            wanted.append(full)
    orig, cand = load_model(original), load_model(candidate)
    mode_note = None
    insisted_exact = mode == "exact"
    if mode == "auto":  # reading every weight of both models costs time: only when the mode depends on it
        lossy_signs = lossy_changes(orig.proto, cand.proto)
        mode = "lossy" if lossy_signs else "exact"
        if lossy_signs:
            mode_note = (
                f"mode lossy (auto): the candidate has lossy changes ({'; '.join(lossy_signs)}), so it is held to "
                "the lossy metric floors; give --mode exact to insist on exact agreement"
            )
    floors: dict[str, float] = {}
    if mode == "lossy":
        given = [metric_floors] if isinstance(metric_floors, Mapping) else list(metric_floors or [])
        floors = {**DEFAULT_LOSSY_FLOORS, **merge_floors([dict(f) for f in given if f])}
    metric_fn = load_metric(metric)

    # Data: the user's, or seeded synthetic inputs (said loudly in the report).
    if data is None:
        feeds = synthetic_feeds(orig.proto, shapes=shapes, count=synthetic_count, seed=seed)
    else:
        if shapes:
            raise UsageError("--shapes only applies to synthetic data; drop it or drop --data")
        feeds = load_feeds(data).bind(orig.proto)
    samples: list[Sample] = []
    for s in feeds.samples():
        samples.append(s)
        if max_samples and len(samples) >= max_samples:
            break
    if not samples:
        raise BadInputError(f"{feeds.description} gave no feeds; give at least one")
    synthetic = bool(getattr(feeds, "synthetic", False))
    data_info = {
        "source": feeds.description,
        "synthetic": synthetic,
        "samples": len(samples),
        "labels": all(LABEL_KEY in s.meta for s in samples),
    }
    if synthetic:
        data_info["plan"] = feeds.plan  # type: ignore[attr-defined]

    names = [o.name for o in orig.proto.graph.output]
    declared = {o.name: declared_dims(o) for o in orig.proto.graph.output}
    channel_axes = parse_channel_axes(channel_axes, names)
    cand_names = {o.name for o in cand.proto.graph.output}
    user = _resolve_thresholds(thresholds, names)
    notes: list[str] = [mode_note] if mode_note else []
    failures: list[str] = []
    if synthetic:
        notes.append(
            "data is SYNTHETIC (seeded random inputs): agreement holds for these inputs only; "
            "give real data with --data for a meaningful check"
        )
    missing = [n for n in names if n not in cand_names]
    if missing:
        failures.append(f"candidate lacks output(s) {', '.join(missing)}")
    compared = [n for n in names if n in cand_names]

    src_o, src_c = _session_source(orig), _session_source(cand)
    ref_info = make_session(src_o, "cpu")
    try:
        cpu_ref = _run_all(ref_info, samples, compared, progress, "original on CPU (reference)")
    except BadInputError as e:
        if not synthetic:
            raise
        dims = ", ".join(f"{n}:{'x'.join(map(str, p['shape']))}" for n, p in feeds.plan.items())  # type: ignore[attr-defined]
        raise BadInputError(
            f"{e} (synthetic inputs {dims}); give the model's real input sizes with --shapes NAME:DxD,... "
            "or real data with --data"
        ) from None
    lab = find_label_output(compared, cpu_ref, samples, label_output) if data_info["labels"] else None
    avail = set(available_providers())
    used: list[str] = []
    skipped: list[dict] = []
    failed: list[dict] = []
    runs: list[dict] = []
    for prov in wanted:
        tag = prov.replace("ExecutionProvider", "")
        if prov not in avail:
            # Not in this build: nothing here could run it, so it is skipped unless the user requires it.
            reason = f"{prov} is not in this onnxruntime build (available: {', '.join(sorted(avail))})"
            skipped.append({"provider": prov, "reason": reason})
            if require_providers:
                failures.append(f"required provider {prov} did not run: {reason}")
            continue
        # Installed: a provider that cannot run this model is exactly what a deployment gate must catch.
        try:
            s_orig, s_cand, o_out, c_out = _provider_runs(
                src_o, src_c, prov, ref_info, cpu_ref, samples, compared, progress
            )
        except _ProviderFailed as e:
            failed.append({"provider": prov, "reason": str(e)})
            failures.append(f"{tag}: provider is installed but could not run the models: {e}")
            continue
        used.append(prov)
        # The model's own noise floor on this provider: ORT optimizations on vs off (and a rerun off CPU).
        noise_out = _run_all(
            make_session(src_o, prov, optimize=True), samples, compared, progress, f"noise floor on {tag}"
        )
        rerun = None if prov == CPU else _run_all(s_orig, samples, compared, progress, f"rerun on {tag}")
        run: dict[str, Any] = {
            "provider": prov,
            "session_providers": list(s_cand.used),
            "passed": True,
            "outputs": {},
            "provider_drift": {},
        }
        origins = [s.origin for s in samples]
        for n in compared:
            noise = _noise(o_out, noise_out, n)
            if rerun is not None:
                again = _noise(o_out, rerun, n)
                noise = {k: max(noise[k], again[k]) for k in noise}
            base = _default_threshold(mode, floors, o_out[0][n].dtype, noise, _max_ref(o_out, n), noise_factor, ulps)
            t = _final_threshold(base, user, n)
            axis = channel_axis_for(n, o_out[0][n], declared.get(n), channel_axes)
            res = compare_output(n, [o[n] for o in o_out], [c[n] for c in c_out], origins, t, channel_axis=axis)
            res["threshold"] = t.to_dict()
            res["noise_floor"] = noise
            run["outputs"][n] = res
            if not res["passed"]:
                run["passed"] = False
                bad = [c for c in res["checks"] if not c["passed"]]
                failures.append(
                    f"{tag}: output '{n}': "
                    + "; ".join(
                        f"{c['check']} = {_fmt(c['value'])} (limit {c.get('op', '')} {_fmt(c['limit'])}"
                        + (f"; {c['detail']})" if c.get("detail") else ")")
                        for c in bad
                    )
                )
            if prov != CPU:
                drift = compare_output(
                    n, [o[n] for o in cpu_ref], [o[n] for o in o_out], origins, None, channel_axis=axis
                )
                run["provider_drift"][n] = drift["metrics"]
        if lab:
            acc_o, acc_c = accuracy(o_out, samples, lab), accuracy(c_out, samples, lab)
            task = {"metric": "accuracy", "output": lab, "original": acc_o, "candidate": acc_c, "drop": acc_o - acc_c}
            drop = _final_threshold(Threshold(accuracy_drop=floors.get("accuracy_drop")), user, lab).accuracy_drop
            if drop is not None:
                task["limit_drop"] = drop
                task["passed"] = bool(acc_o - acc_c <= drop)
                if not task["passed"]:
                    run["passed"] = False
                    failures.append(f"{tag}: accuracy dropped {acc_o - acc_c:.4f} > {drop:g}")
            run["task"] = task
        if prov != CPU and samples:
            run["node_placement"] = _placement(src_c, prov, samples[0].feeds)
            cpu_nodes = run["node_placement"].get(CPU, 0)
            if cpu_nodes:
                notes.append(
                    f"{tag}: {cpu_nodes} node(s) of the candidate were handed back to the CPU "
                    f"(placement: {run['node_placement']})"
                )
        if metric_fn is not None:
            run["user_metric"] = user_metric(metric_fn, o_out, c_out, samples)
        runs.append(run)
    if not used:
        failures.append(
            "no requested provider ran: " + "; ".join(f"{s['provider']}: {s['reason']}" for s in skipped + failed)
        )

    explained = None
    if explain:
        explained = explain_divergence(orig, cand, samples[: max(1, explain_samples)], mode, floors, progress)
    passed = not failures and all(r["passed"] for r in runs)
    if insisted_exact and not passed:  # why an exact check of a compressed model fails, and what to ask instead
        lossy_signs = lossy_changes(orig.proto, cand.proto)
        if lossy_signs:
            notes.append(
                f"the candidate has lossy changes ({'; '.join(lossy_signs)}) but is checked in exact mode; "
                "--mode lossy (or leaving --mode out) judges it by the lossy metric floors"
            )
    log.info(
        "parity %s: %s on %s (%d feeds%s)",
        "pass" if passed else "FAIL",
        _label_of(candidate),
        ", ".join(used) or "no provider",
        len(samples),
        ", synthetic" if synthetic else "",
    )
    return ParityResult(
        passed=passed,
        original=_label_of(original),
        candidate=_label_of(candidate),
        mode=mode,
        seed=seed,
        data=data_info,
        providers={
            "requested": wanted,
            "used": used,
            "skipped": skipped,
            "failed": failed,
            "required": require_providers,
            "label_output": lab,
        },
        versions=_versions(),
        runs=runs,
        failures=failures,
        notes=notes,
        explain=explained,
    )


def _placement(src: Any, prov: str, feeds: dict[str, np.ndarray]) -> dict[str, int] | str:
    try:
        return node_placement(src, prov, feeds)
    except Exception as e:  # placement is diagnostic: never fail the check over it
        return f"unknown ({type(e).__name__}: {str(e).splitlines()[0][:200]})"


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# ------------------------------------------------------------------------------------------ explain
def explain_divergence(
    orig,
    cand,
    samples: list[Sample],
    mode: str,
    floors: dict[str, float],
    progress: Progress | None = None,
    top: int = 5,
) -> dict:
    """Expose tensors present in both models (by name) as outputs, run both on CPU, compare in the
    original's topological order; the first beyond the criterion is where they diverge."""
    from .parity_metrics import cosine_similarity, snr_db

    po, pc = _with_all_outputs(orig), _with_all_outputs(cand)
    order = [o for n in po.graph.node for o in n.output if o]
    producer = {o: (n.name, n.op_type) for n in po.graph.node for o in n.output}
    in_cand = {o.name for o in pc.graph.output}
    common = [t for t in dict.fromkeys(order) if t in in_cand and t in {o.name for o in po.graph.output}]
    if not common:
        return {"compared": 0, "note": "the models share no intermediate tensor names; nothing to compare"}
    ro = _run_all(make_session(po, "cpu"), samples, common, progress, "explain: original")
    rc = _run_all(make_session(pc, "cpu"), samples, common, progress, "explain: candidate")
    rel_limit = 1e-4 if mode == "exact" else None
    cos_limit = None if mode == "exact" else floors.get("cosine", 0.99)
    layers = []
    first = None
    for t in common:
        a = [np.asarray(o[t]) for o in ro]
        b = [np.asarray(o[t]) for o in rc]
        if any(x.shape != y.shape for x, y in zip(a, b)) or a[0].dtype.kind != "f":
            continue
        r = np.concatenate([x.astype(np.float64).ravel() for x in a])
        c = np.concatenate([y.astype(np.float64).ravel() for y in b])
        ok = np.isfinite(r) & np.isfinite(c)
        r, c = r[ok], c[ok]
        if not r.size:
            continue
        err = np.abs(c - r)
        scale = float(np.abs(r).max()) or 1.0
        entry = {
            "tensor": t,
            "node": producer[t][0],
            "op_type": producer[t][1],
            "snr_db": snr_db(r, c - r),
            "cosine": float(cosine_similarity(r, c)),
            "max_abs": float(err.max()),
            "max_abs_scaled": float(err.max()) / scale,
        }
        layers.append(entry)
        diverged = entry["max_abs_scaled"] > rel_limit if rel_limit is not None else entry["cosine"] < cos_limit
        if diverged and first is None:
            first = entry
    worst = sorted(layers, key=lambda e: e["snr_db"])[:top]
    return {
        "compared": len(layers),
        "samples": len(samples),
        "criterion": f"max|c-r|/max|r| > {rel_limit:g}" if rel_limit is not None else f"cosine < {cos_limit:g}",
        "first_divergent": first,
        "worst": worst,
    }


def _with_all_outputs(loaded) -> onnx.ModelProto:
    model = onnx.ModelProto()
    model.CopyFrom(loaded.proto)
    if loaded.has_external_data and loaded.base_dir is not None:
        from onnx.external_data_helper import load_external_data_for_model

        load_external_data_for_model(model, str(loaded.base_dir))
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # shape inference is a help here, not a requirement
        inferred = model
    types = {
        vi.name: vi.type.tensor_type.elem_type
        for vi in list(inferred.graph.value_info) + list(inferred.graph.output)
        if vi.type.HasField("tensor_type")
    }
    have = {o.name for o in model.graph.output} | {i.name for i in model.graph.input}
    for n in model.graph.node:
        for o in n.output:
            if o and o not in have and types.get(o):
                model.graph.output.append(onnx.helper.make_tensor_value_info(o, types[o], None))
                have.add(o)
    return model
