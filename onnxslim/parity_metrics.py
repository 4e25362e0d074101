"""Parity metrics (what differs, measured) and thresholds (what is allowed), kept apart.

Metrics per output, over every sample: max/mean absolute and relative error, the ``q``-quantile of the
absolute error, cosine similarity, SNR in dB (capped at 300 dB: identical outputs, JSON-safe), the worst
channel (slices along a channel axis: per-channel max error and cosine) and the worst sample (row of axis 0);
integer outputs add the fraction of equal elements; ``[batch, classes]`` float outputs add top-1/top-k agreement.
One number over a whole tensor hides local damage, so the default lossy gate also looks at the worst
channel and the worst sample.

Relative error divides by ``max(|ref|, 1e-3 * rms(ref))`` so near-zero references do not explode it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .errors import UsageError

__all__ = [
    "Threshold",
    "compare_output",
    "default_channel_axis",
    "SNR_CAP_DB",
    "merge_floors",
    "cosine_similarity",
    "snr_db",
]

SNR_CAP_DB = 300.0
_STATISTICS = ("max", "mean", "quantile")
# Metric floors a lossy pass may declare (higher is better), and ceilings (lower is better).
FLOOR_KEYS = ("cosine", "channel_cosine", "sample_cosine", "snr_db", "top1_agreement", "fraction_equal")
CEILING_KEYS = ("accuracy_drop",)


@dataclass
class Threshold:
    """What one output may differ by. ``atol``/``rtol`` bound ``|c - r| <= atol + rtol * |r|`` under a
    statistic: ``max`` (every element), ``mean`` (the average ratio) or ``quantile`` (the ``quantile``-th
    ratio). The floors are minimums for the matching metrics; None disables a check."""

    atol: float | None = None
    rtol: float = 0.0
    statistic: str = "max"
    quantile: float = 0.999
    cosine: float | None = None
    channel_cosine: float | None = None
    sample_cosine: float | None = None
    snr_db: float | None = None
    top1_agreement: float | None = None
    fraction_equal: float | None = None
    accuracy_drop: float | None = None
    source: str = ""

    def __post_init__(self) -> None:
        if self.statistic not in _STATISTICS:
            raise UsageError(f"unknown statistic {self.statistic!r}; use one of {', '.join(_STATISTICS)}")
        if not 0.0 < self.quantile <= 1.0:
            raise UsageError(f"quantile must be in (0, 1], got {self.quantile}")

    def to_dict(self) -> dict:
        return asdict(self)

    def updated(self, **changes: Any) -> Threshold:
        d = self.to_dict()
        for k, v in changes.items():
            if k not in d:
                raise UsageError(f"unknown threshold {k!r}; known: {', '.join(sorted(d))}")
            d[k] = _coerce(k, v)
        return Threshold(**d)


def _coerce(key: str, value: Any) -> Any:
    if key in ("statistic", "source"):
        return str(value)
    if value is None or (isinstance(value, str) and value.lower() == "none"):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UsageError(f"threshold {key} must be a number, got {value!r}") from None


def merge_floors(floors: list[dict[str, float]]) -> dict[str, float]:
    """Floors of several lossy passes: the most lenient floor and the largest allowed drop win."""
    out: dict[str, float] = {}
    for f in floors:
        for k, v in f.items():
            if k in CEILING_KEYS:
                out[k] = max(out.get(k, v), v)
            else:
                out[k] = min(out.get(k, v), v)
    return out


def cosine_similarity(a: np.ndarray, b: np.ndarray, axis=None) -> np.ndarray | float:
    num = np.sum(a * b, axis=axis)
    den = np.sqrt(np.sum(a * a, axis=axis) * np.sum(b * b, axis=axis))
    both_zero = (den == 0) & (np.sum(np.abs(a - b), axis=axis) == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        c = np.where(den > 0, num / np.where(den > 0, den, 1), np.where(both_zero, 1.0, 0.0))
    return float(c) if np.ndim(c) == 0 else c


def snr_db(ref: np.ndarray, err: np.ndarray) -> float:
    p_sig, p_err = float(np.sum(ref * ref)), float(np.sum(err * err))
    if p_err == 0:
        return SNR_CAP_DB
    if p_sig == 0:
        return -SNR_CAP_DB
    return float(min(SNR_CAP_DB, 10.0 * math.log10(p_sig / p_err)))


def _f(x: Any) -> float:
    return float(x)


def compare_output(
    name: str,
    refs: list[np.ndarray],
    cands: list[np.ndarray],
    origins: list[str],
    threshold: Threshold | None = None,
    k: int = 5,
    channel_axis: int = 1,
) -> dict:
    """Metrics of ``cands`` against ``refs`` (one array per feed), and the threshold's checks on them.
    ``channel_axis``: the axis whose slices are the "channels" of the worst-channel metrics."""
    out: dict[str, Any] = {"metrics": {}, "checks": [], "passed": True}
    m = out["metrics"]
    problems = []
    for r, c, o in zip(refs, cands, origins):
        if r.shape != c.shape:
            problems.append(f"{o}: shape {list(c.shape)} vs reference {list(r.shape)}")
        elif r.dtype != c.dtype:
            problems.append(f"{o}: dtype {c.dtype} vs reference {r.dtype}")
    if problems:
        out["checks"].append({"check": "shape/dtype", "value": problems[0], "limit": "equal", "passed": False})
        out["passed"] = False
        return out
    if not refs:
        return out
    dtype = refs[0].dtype
    m["dtype"] = str(dtype)
    m["shape"] = list(refs[0].shape)
    if dtype.kind not in "fciub":
        same = all(np.array_equal(r, c) for r, c in zip(refs, cands))
        m["fraction_equal"] = 1.0 if same else 0.0
        _check(out, "fraction_equal", m["fraction_equal"], 1.0, ">=")
        return out
    rf = np.concatenate([r.astype(np.float64).ravel() for r in refs])
    cf = np.concatenate([c.astype(np.float64).ravel() for c in cands])
    m["elements"] = int(rf.size)
    fin_r, fin_c = np.isfinite(rf), np.isfinite(cf)
    same_special = (rf == cf) | (np.isnan(rf) & np.isnan(cf))  # inf == inf, nan "==" nan
    m["nonfinite_mismatch"] = int(np.sum(fin_r != fin_c) + np.sum(~fin_r & ~fin_c & ~same_special))
    both = fin_r & fin_c
    rf, cf = rf[both], cf[both]
    err = np.abs(cf - rf)
    m["max_abs"] = _f(err.max()) if err.size else 0.0
    m["mean_abs"] = _f(err.mean()) if err.size else 0.0
    m["max_ref"] = _f(np.abs(rf).max()) if rf.size else 0.0
    rms = float(np.sqrt(np.mean(rf * rf))) if rf.size else 0.0
    rel = err / np.maximum(np.abs(rf), max(1e-3 * rms, np.finfo(np.float64).tiny))
    m["max_rel"] = _f(rel.max()) if rel.size else 0.0
    m["mean_rel"] = _f(rel.mean()) if rel.size else 0.0
    q = threshold.quantile if threshold else 0.999
    m["quantile"] = q
    m["quantile_abs"] = _f(np.quantile(err, q)) if err.size else 0.0
    m["cosine"] = _f(cosine_similarity(rf, cf))
    m["snr_db"] = snr_db(rf, cf - rf)
    if dtype.kind in "iub":
        m["fraction_equal"] = _f(np.mean(rf == cf)) if rf.size else 1.0
    _channel_and_sample_metrics(m, refs, cands, origins, channel_axis)
    if dtype.kind == "f" and refs[0].ndim == 2 and refs[0].shape[1] > 1:
        _topk(m, refs, cands, k)
    if threshold is not None:
        _apply(out, threshold, rf, cf, err)
    return out


def default_channel_axis(declared: list | None, shape: tuple[int, ...]) -> int:
    """The axis a reader calls channels: axis 1 of feature maps (rank >= 4); otherwise, among axes 1.., the
    smallest of size >= 2 whose size the model fixes (a named dim such as ``seq`` or ``anchors`` is not a
    channel), else the smallest of size >= 2. [1, 22, 2100] -> 1 (22 rows: boxes and class scores);
    [1, 2100, 22] -> 2; [batch, seq, 384] -> 2; [batch, 10] -> 1."""
    if len(shape) < 2:
        return 1
    if len(shape) >= 4 and shape[1] >= 2:
        return 1  # NCHW-style feature maps: C, whatever H and W are
    axes = [i for i in range(1, len(shape)) if shape[i] >= 2]
    if not axes:
        return 1
    fixed = [i for i in axes if declared and i < len(declared) and isinstance(declared[i], int) and declared[i] > 0]
    pool = fixed or axes
    return min(pool, key=lambda i: (shape[i], i))


def _channel_and_sample_metrics(m: dict, refs, cands, origins, channel_axis: int = 1) -> None:
    # Worst sample: rows of axis 0 across all feeds.
    worst = (2.0, -1.0, "")
    for r, c, o in zip(refs, cands, origins):
        if r.ndim == 0:
            continue
        r2 = r.astype(np.float64).reshape(r.shape[0], -1)
        c2 = c.astype(np.float64).reshape(c.shape[0], -1)
        cos = np.atleast_1d(cosine_similarity(r2, c2, axis=1))
        mx = np.max(np.abs(c2 - r2), axis=1) if r2.shape[1] else np.zeros(r2.shape[0])
        for i in range(r2.shape[0]):
            key = (float(cos[i]), -float(mx[i]))
            if key < (worst[0], -worst[1]):
                worst = (float(cos[i]), float(mx[i]), f"{o}[{i}]")
    if worst[2]:
        m["worst_sample"] = worst[2]
        m["worst_sample_cosine"] = worst[0]
        m["worst_sample_max_abs"] = worst[1]
    # Worst channel: slices along channel_axis (NCHW channels, [batch, features] features, a detector's rows).
    ax = channel_axis
    if refs[0].ndim < 2 or not 0 < ax < refs[0].ndim or len({r.shape[ax] for r in refs}) != 1 or refs[0].shape[ax] < 2:
        return
    n = refs[0].shape[ax]
    rc = np.concatenate([np.moveaxis(r.astype(np.float64), ax, 0).reshape(n, -1) for r in refs], axis=1)
    cc = np.concatenate([np.moveaxis(c.astype(np.float64), ax, 0).reshape(n, -1) for c in cands], axis=1)
    cos = np.atleast_1d(cosine_similarity(rc, cc, axis=1))
    mx = np.max(np.abs(cc - rc), axis=1)
    m["channel_axis"] = ax
    j = int(np.argmin(cos))
    m["worst_channel"] = j
    m["worst_channel_cosine"] = float(cos[j])
    m["channel_max_abs"] = float(mx.max())
    m["worst_abs_channel"] = int(np.argmax(mx))


def _topk(m: dict, refs, cands, k: int) -> None:
    rows = hits1 = hitsk = 0
    kk = min(k, refs[0].shape[1])
    for r, c in zip(refs, cands):
        top_r = np.argsort(-r, axis=1, kind="stable")[:, :kk]
        arg_c = np.argmax(c, axis=1)
        hits1 += int(np.sum(top_r[:, 0] == arg_c))
        hitsk += int(np.sum(np.any(top_r == arg_c[:, None], axis=1)))
        rows += r.shape[0]
    m["top1_agreement"] = hits1 / rows if rows else 1.0
    m["topk"] = kk
    m["topk_agreement"] = hitsk / rows if rows else 1.0


def _check(out: dict, name: str, value: float, limit: float, op: str) -> None:
    ok = value >= limit if op == ">=" else value <= limit
    out["checks"].append({"check": name, "value": value, "limit": limit, "op": op, "passed": bool(ok)})
    if not ok:
        out["passed"] = False


def _apply(out: dict, t: Threshold, rf: np.ndarray, cf: np.ndarray, err: np.ndarray) -> None:
    m = out["metrics"]
    if m.get("nonfinite_mismatch"):
        _check(out, "nonfinite_mismatch", m["nonfinite_mismatch"], 0, "<=")
    if t.atol is not None and err.size:
        tol = t.atol + t.rtol * np.abs(rf)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(tol > 0, err / np.where(tol > 0, tol, 1), np.where(err > 0, np.inf, 0.0))
        stat = {"max": lambda a: a.max(), "mean": lambda a: a.mean(), "quantile": lambda a: np.quantile(a, t.quantile)}[
            t.statistic
        ](ratio)
        stat_name = t.statistic if t.statistic != "quantile" else f"q{t.quantile:g}"
        value = float(stat) if np.isfinite(stat) else 1e300
        _check(out, "tolerance", value, 1.0, "<=")
        out["checks"][-1]["detail"] = f"{stat_name}(|c-r| / (atol + rtol*|r|)), atol={t.atol:.3g}, rtol={t.rtol:.3g}"
        m["tolerance_ratio"] = value
    for key, metric in (
        ("cosine", "cosine"),
        ("channel_cosine", "worst_channel_cosine"),
        ("sample_cosine", "worst_sample_cosine"),
        ("snr_db", "snr_db"),
        ("top1_agreement", "top1_agreement"),
        ("fraction_equal", "fraction_equal"),
    ):
        floor = getattr(t, key)
        if floor is not None and metric in m:
            _check(out, metric, m[metric], floor, ">=")


def declared_dims(vi) -> list | None:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]


def parse_channel_axes(given, names: list[str]) -> dict[str, int]:
    """``"boxes:2,*:1"`` or a mapping -> output name (or ``"*"``) -> channel axis, names checked."""
    if not given:
        return {}
    if isinstance(given, str):
        items = {}
        for part in filter(None, (p.strip() for p in given.split(","))):
            name, sep, axis = part.rpartition(":")
            try:
                items[name if sep else "*"] = int(axis)
            except ValueError:
                raise UsageError(
                    f"channel axis {part!r}: write OUTPUT:AXIS (or AXIS for every output), e.g. boxes:2"
                ) from None
        given = items
    unknown = sorted(set(given) - set(names) - {"*"})
    if unknown:
        raise UsageError(f"channel axis for {', '.join(unknown)}: not an output (outputs: {', '.join(names)})")
    return {str(k): int(v) for k, v in given.items()}


def channel_axis_for(name: str, ref: np.ndarray, declared: list | None, chosen: dict[str, int]) -> int:
    if name not in chosen and ("*" not in chosen or ref.ndim < 2):
        return default_channel_axis(declared, ref.shape)
    axis = chosen.get(name, chosen.get("*", 1))
    if ref.ndim < 2 or not -ref.ndim < axis < ref.ndim or axis % ref.ndim == 0:
        raise UsageError(
            f"channel axis {axis} of output '{name}' (shape {list(ref.shape)}): give an axis 1..{max(ref.ndim - 1, 1)}"
        )
    return axis % ref.ndim
