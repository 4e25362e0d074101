"""One report: before/after summary, one record per pass, parity results. Rendered as text or JSON."""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .summary import ModelSummary

__all__ = ["PassRecord", "Report", "write_json_atomic", "dumps_json"]

REPORT_VERSION = 1


@dataclass
class PassRecord:
    name: str
    options: dict[str, Any]
    exact: bool
    modified: bool = False
    stats: dict[str, float] = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    layers: list[dict] = field(default_factory=list)  # per-layer facts of passes that change layers
    seconds: float = 0.0
    iteration: int = 0
    error: str | None = None  # set when the pass failed and its changes were rolled back

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Report:
    input: str | None = None
    output: str | None = None
    before: ModelSummary | None = None
    after: ModelSummary | None = None
    passes: list[PassRecord] = field(default_factory=list)
    parity: dict[str, Any] | None = None
    checker: str = ""
    seconds: float = 0.0
    seed: int = 0
    calibration: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    # -------------------------------------------------------------------------------------- JSON
    def to_dict(self) -> dict:
        d = asdict(self)
        d["report_version"] = REPORT_VERSION
        return d

    def to_json(self, indent: int = 2) -> str:
        return dumps_json(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict) -> Report:
        d = dict(d)
        d.pop("report_version", None)
        for key in ("before", "after"):
            if d.get(key) is not None:
                d[key] = ModelSummary.from_dict(d[key])
        d["passes"] = [PassRecord(**p) for p in d.get("passes", [])]
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> Report:
        return cls.from_dict(json.loads(text))

    def write_json(self, path: str | os.PathLike) -> None:
        write_json_atomic(path, self.to_json())

    def pass_totals(self) -> list[PassRecord]:
        """One record per pass, summed over fixed-point rounds (stats, seconds; modified if any round was)."""
        totals: dict[str, PassRecord] = {}
        for p in self.passes:
            t = totals.get(p.name)
            if t is None:
                totals[p.name] = t = PassRecord(p.name, p.options, p.exact)
            t.modified = t.modified or p.modified
            for k, v in p.stats.items():
                t.stats[k] = t.stats.get(k, 0) + v
            if p.iteration == max(q.iteration for q in self.passes if q.name == p.name):
                t.skipped = list(p.skipped)  # what the last round still could not do
                t.layers = list(p.layers)
            t.seconds += p.seconds
            t.error = t.error or p.error
        return list(totals.values())

    # -------------------------------------------------------------------------------------- text
    def render_text(self, width: int = 120) -> str:
        """A human-readable summary (rich tables rendered to plain text)."""
        from rich.console import Console

        buf = io.StringIO()
        console = Console(file=buf, width=width, force_terminal=False, color_system=None)
        for renderable in self.renderables():
            console.print(renderable)
        return buf.getvalue()

    def renderables(self) -> list:
        from rich.table import Table

        out: list = []
        if self.before is not None:
            t = Table(
                title=f"onnxslim: {self.input or 'model'} -> {self.output or '(not saved)'}", title_justify="left"
            )
            t.add_column("")
            t.add_column("before", justify="right")
            t.add_column("after", justify="right")
            t.add_column("change", justify="right")
            after = self.after or self.before
            rows = [
                ("nodes", self.before.nodes, after.nodes, _int),
                ("params", self.before.params, after.params, _int),
                ("initializer bytes", self.before.initializer_bytes, after.initializer_bytes, _bytes),
                ("file size", self.before.file_size, after.file_size, _bytes),
            ]
            for label, b, a, fmt in rows:
                t.add_row(label, fmt(b), fmt(a), _delta(b, a))
            ops = sorted(
                set(self.before.op_types) | set(after.op_types), key=lambda k: (-self.before.op_types.get(k, 0), k)
            )
            for op in ops:
                b, a = self.before.op_types.get(op, 0), after.op_types.get(op, 0)
                t.add_row(f"  {op}", str(b), str(a), _delta(b, a) if a != b else "")
            out.append(t)
        if self.passes:
            rounds = 1 + max(p.iteration for p in self.passes)
            t = Table(
                title=f"passes ({rounds} round{'s' if rounds > 1 else ''} to a fixed point; totals per pass)"
                if rounds > 1
                else "passes",
                title_justify="left",
            )
            for col in ("#", "pass", "kind", "modified", "stats", "skipped", "s"):
                t.add_column(col)
            for i, p in enumerate(self.pass_totals(), 1):
                stats = ", ".join(f"{k}={_num(v)}" for k, v in p.stats.items() if v) or "-"
                if p.error:
                    stats = f"FAILED, rolled back: {p.error}"
                t.add_row(
                    str(i),
                    p.name,
                    "exact" if p.exact else "lossy",
                    "yes" if p.modified else "no",
                    stats,
                    str(len(p.skipped)) if p.skipped else "",
                    f"{p.seconds:.3f}",
                )
            out.append(t)
            for p in self.pass_totals():
                if p.layers:
                    out.append(_layers_table(p.name, p.layers))
        if self.parity:
            out.extend(_parity_renderables(self.parity))
        for w in self.warnings:
            out.append(f"warning: {w}")
        if self.checker:
            out.append(f"checker: {self.checker}   total {self.seconds:.2f}s")
        return out


_LAYER_ROWS = 20


def _layers_table(name: str, layers: list[dict]):
    """A pass's per-layer facts: the largest layers first (by the first numeric column), all of them in JSON."""
    from rich.table import Table

    cols = list(dict.fromkeys(k for d in layers for k in d))
    key = next(
        (c for c in cols if isinstance(layers[0].get(c), (int, float)) and not isinstance(layers[0].get(c), bool)), None
    )
    rows = sorted(layers, key=lambda d: -float(d.get(key) or 0)) if key else list(layers)
    shown = rows[:_LAYER_ROWS]
    more = f" ({len(shown)} of {len(rows)} shown; all in the JSON report)" if len(rows) > len(shown) else ""
    t = Table(title=f"{name}: per layer{more}", title_justify="left")
    for c in cols:
        t.add_column(c, overflow="fold", justify="left" if c in ("layer", "op", "name") else "right")
    for d in shown:
        t.add_row(*(_num(d[c]) if isinstance(d.get(c), float) else str(d.get(c, "")) for c in cols))
    return t


def _parity_renderables(parity: dict) -> list:
    """Per provider and output: the worst-case metrics, the checks and the verdict; then explain."""
    from rich.table import Table

    verdict = parity.get("verdict") or ("pass" if parity.get("passed") else "FAIL")
    out: list = []
    data = parity.get("data") or {}
    provs = parity.get("providers") or {}
    head = f"parity ({parity.get('mode', '?')}): {verdict}"
    if data:
        head += f"   data: {data.get('source')} [{data.get('samples')} feeds]" + (
            " SYNTHETIC" if data.get("synthetic") else ""
        )
    out.append(head)
    runs = parity.get("runs") or []
    if runs:
        t = Table(title="parity per provider and output (candidate vs original)", title_justify="left")
        drifts = any(r.get("provider_drift") for r in runs)
        cols = (
            [
                "EP",
                "output",
                "max|d|",
                "mean|d|",
                "max rel",
                "cos",
                "SNR dB",
                "worst ch cos",
                "worst smp cos",
                "top1/eq",
            ]
            + (["EP drift max|d|"] if drifts else [])
            + ["result"]
        )
        for col in cols:
            t.add_column(col, overflow="fold")
        for r in runs:
            tag = r["provider"].replace("ExecutionProvider", "")
            for name, o in r.get("outputs", {}).items():
                m = o.get("metrics", {})
                drift = (r.get("provider_drift") or {}).get(name, {})
                bad = [c["check"] for c in o.get("checks", []) if not c.get("passed")]
                agree = m.get("top1_agreement", m.get("fraction_equal"))
                t.add_row(
                    tag,
                    name,
                    _g(m.get("max_abs")),
                    _g(m.get("mean_abs")),
                    _g(m.get("max_rel")),
                    _g(m.get("cosine"), 6),
                    _g(m.get("snr_db"), 4),
                    _g(m.get("worst_channel_cosine"), 6),
                    _g(m.get("worst_sample_cosine"), 6),
                    _g(agree, 4),
                    *([_g(drift.get("max_abs")) if drift else ""] if drifts else []),
                    "pass" if o.get("passed") else "FAIL " + ",".join(bad),
                )
            task = r.get("task")
            if task:
                out_line = (
                    f"{tag}: {task['metric']} on '{task['output']}': original {task['original']:.4f}, "
                    f"candidate {task['candidate']:.4f} (drop {task['drop']:+.4f})"
                )
                if "limit_drop" in task:
                    out_line += f", limit {task['limit_drop']:g}: " + ("pass" if task.get("passed") else "FAIL")
                runs_lines = out_line
            else:
                runs_lines = ""
            if runs_lines:
                t.caption = ((t.caption + "\n") if t.caption else "") + runs_lines
        out.append(t)
    for s in provs.get("skipped") or []:
        out.append(f"provider skipped: {s['provider']}: {s['reason']}")
    for s in provs.get("failed") or []:
        out.append(f"provider FAILED: {s['provider']}: {s['reason']}")
    ex = parity.get("explain")
    if ex:
        first = ex.get("first_divergent")
        if first:
            out.append(
                f"explain: first divergent tensor '{first['tensor']}' from {first['op_type']} node "
                f"'{first['node']}' (SNR {first['snr_db']:.1f} dB, {ex.get('criterion')})"
            )
        else:
            out.append(
                f"explain: no intermediate tensor diverges ({ex.get('compared', 0)} compared, "
                f"{ex.get('criterion', '')})"
            )
        if ex.get("worst"):
            out.append(
                "explain: worst by SNR: " + ", ".join(f"{w['node']} ({w['snr_db']:.1f} dB)" for w in ex["worst"])
            )
    for n in parity.get("notes") or []:
        out.append(f"note: {n}")
    for f in parity.get("failures") or []:
        out.append(f"failed: {f}")
    return out


def _g(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def write_json_atomic(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-onnxslim")
    tmp.write_text(text)
    os.replace(tmp, path)


_NON_FINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def _finite(o: Any) -> Any:
    import numpy as np

    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    if isinstance(o, np.ndarray):
        return _finite(o.tolist())
    if isinstance(o, np.generic):
        o = o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return _NON_FINITE[repr(o)]
    return o


def dumps_json(obj: Any, indent: int | None = 2) -> str:
    """Strict JSON: NaN and infinities become the strings "NaN", "Infinity", "-Infinity" (bare NaN is not JSON)."""
    return json.dumps(_finite(obj), indent=indent, default=_jsonable, allow_nan=False)


def _jsonable(o: Any):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def _int(v) -> str:
    return "-" if v is None else f"{v:,}"


def _num(v) -> str:
    return f"{v:,}" if isinstance(v, int) or (isinstance(v, float) and v.is_integer()) else f"{v:.4g}"


def _bytes(v) -> str:
    if v is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(v) < 1024 or unit == "GiB":
            return f"{v:,.0f} {unit}" if unit == "B" else f"{v:,.2f} {unit}"
        v /= 1024
    return str(v)


def _delta(b, a) -> str:
    if b is None or a is None:
        return ""
    if b == 0:
        return "" if a == 0 else f"+{a}"
    pct = 100.0 * (a - b) / b
    return f"{pct:+.1f}%"
