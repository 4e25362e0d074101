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
    next_steps: list[str] = field(default_factory=list)  # after a failed gate: what to try (onnxslim.suggest)
    latency: dict[str, Any] | None = None  # onnxruntime CPU latency, input vs result (onnxslim.latency)
    auto: dict[str, Any] | None = None  # the automatic search: candidates, Pareto front, sensitivity (onnxslim.auto)

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
            t.notes.extend(n for n in p.notes if n not in t.notes)
            t.seconds += p.seconds
            t.error = t.error or p.error
        return list(totals.values())

    # -------------------------------------------------------------------------------------- text
    def render_text(self, width: int = 120) -> str:
        """A human-readable summary (rich tables rendered to plain text)."""
        from rich.console import Console

        buf = io.StringIO()
        console = Console(file=buf, width=width, force_terminal=False, color_system=None)
        for renderable in self.renderables(width=width):
            console.print(renderable)
        return buf.getvalue()

    def renderables(self, width: int = 120) -> list:
        """Tables and lines; ``narrow`` (under ~110 columns): only the passes that changed something, and the
        parity table without its secondary columns (the JSON has everything)."""
        narrow = width < 110
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
            # Q/DQ pairs and the weight-decoding chains of packed weights (folded by onnxruntime when it loads the
            # model) are not compute: counted apart so "+117% nodes" after int8 does not read as a bigger model.
            kinds = [(label, ops) for label, ops in _NODE_KINDS if _count(self.before, ops) or _count(after, ops)]
            compute = [self.before.nodes, after.nodes]
            for _, ops in kinds:
                compute = [compute[0] - _count(self.before, ops), compute[1] - _count(after, ops)]
            rows = [("nodes" if not kinds else "compute nodes", compute[0], compute[1], _int)]
            rows += [(label, _count(self.before, ops), _count(after, ops), _int) for label, ops in kinds]
            rows += [
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
            totals = self.pass_totals()
            shown = [p for p in totals if p.modified or p.error] if narrow else totals
            longest = max((len(p.name) + (0 if p.exact or not narrow else 8) for p in shown), default=4)
            t.add_column("#")
            t.add_column("pass", no_wrap=True, min_width=longest)  # a name a user types: never cut
            cols = ("stats", "s") if narrow else ("kind", "modified", "stats", "skipped", "s")
            for col in cols:
                t.add_column(col, overflow="fold", ratio=1 if col == "stats" else None)
            if narrow and len(shown) < len(totals):
                t.caption = f"{len(totals) - len(shown)} more pass(es) changed nothing"
                t.caption_justify = "left"
            for i, p in enumerate(totals, 1):
                if p not in shown:
                    continue
                stats = ", ".join(f"{k}={_num(v)}" for k, v in p.stats.items() if v) or "-"
                if p.error:
                    stats = f"FAILED, rolled back: {p.error}"
                if narrow:  # only passes that changed something are shown; lossy ones say so in the name column
                    t.add_row(str(i), p.name + ("" if p.exact else " (lossy)"), stats, f"{p.seconds:.2f}")
                    continue
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
            out.extend(_facts_lines(self.pass_totals(), width))
            for p in self.pass_totals():
                if p.layers:
                    out.append(_layers_table(p.name, p.layers))
        if self.auto:
            from .auto.render_auto import auto_renderables  # the search's own tables, kept with the search

            out.extend(auto_renderables(self.auto, narrow))
        if self.parity:
            out.extend(_parity_renderables(self.parity, narrow))
        out.extend(f"next step: {step}" for step in self.next_steps)
        out.extend(_latency_lines(self.latency))
        for w in self.warnings:
            out.append(f"warning: {w}")
        if self.checker:
            out.append(f"checker: {self.checker}   total {self.seconds:.2f}s")
        return out


_LAYER_ROWS = 20
_FACT_REASONS = 3


def _facts_lines(passes: list[PassRecord], width: int = 120) -> list[str]:
    """What the passes decided and why, in one short section: their notes (the target CPU, weight bits, opset
    limits, allocations) and, grouped, why nodes were left as they were (the JSON lists every node)."""
    from collections import Counter

    lines = []
    for p in passes:
        for note in dict.fromkeys(p.notes):
            lines.append(f"  {p.name}: {note}")
        reasons = Counter(s.get("reason", "?") for s in p.skipped)
        if reasons and not p.exact:
            top = "; ".join(f"{r} ({n})" for r, n in reasons.most_common(_FACT_REASONS))
            more = (
                f"; {len(reasons) - _FACT_REASONS} more reason(s) in the JSON" if len(reasons) > _FACT_REASONS else ""
            )
            lines.append(f"  {p.name}: {sum(reasons.values())} node(s) left as they were: {top}{more}")
    if not lines:
        return []
    import textwrap

    wrapped = [w for line in lines for w in textwrap.wrap(line, width - 1, subsequent_indent="    ")]
    return ["facts:", *wrapped]


_NODE_KINDS = (
    ("Q/DQ nodes", ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")),
    ("weight-decoding nodes", ("BitShift", "BitwiseAnd", "CumSum", "Mod", "ScatterElements")),
)


def _count(summary, ops) -> int:
    return sum(summary.op_types.get(op, 0) for op in ops)


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


_NAME_WIDTH = 28


def shorten_middle(text: str, width: int) -> str:
    """``text`` cut from the middle to ``width`` characters: the head and the tail tell similar names apart."""
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    return text[:head] + "…" + text[len(text) - (width - 1 - head) :]


def _output_names(runs: list[dict]) -> list[str]:
    return [n for r in runs for n in r.get("outputs", {})] or ["output"]


def _parity_renderables(parity: dict, narrow: bool = False) -> list:
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
        drifts = drifts and not narrow
        secondary = () if narrow else ("mean|d|", "max rel")
        cols = [
            "EP",
            "output",
            "max|d|",
            *secondary,
            "cos",
            "SNR dB",
            "ch cos" if narrow else "worst ch cos",
            "smp cos" if narrow else "worst smp cos",
            "top1/eq",
            *(["EP drift max|d|"] if drifts else []),
            "result",
        ]
        digits = 4 if narrow else 6
        for col in cols:
            if col == "output":  # names stay distinguishable: cut from the middle, never wrapped or cut at the end
                t.add_column(col, no_wrap=True, min_width=min(_NAME_WIDTH, max(len(n) for n in _output_names(runs))))
            else:
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
                    shorten_middle(name, _NAME_WIDTH),
                    _g(m.get("max_abs")),
                    *((_g(m.get("mean_abs")), _g(m.get("max_rel"))) if secondary else ()),
                    _g(m.get("cosine"), digits),
                    _g(m.get("snr_db"), 3 if narrow else 4),
                    _g(m.get("worst_channel_cosine"), digits),
                    _g(m.get("worst_sample_cosine"), digits),
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


def _latency_lines(latency: dict | None) -> list[str]:
    """Latency per thread setting (input -> result); lines stay within 80 columns. (The int8 target and the
    CPU flags behind it are in the facts section, from the quantize pass's note.)"""
    out: list[str] = []
    lat = latency or {}
    if latency is not None:
        settings = lat.get("settings") or []
        if not lat.get("measured") or not settings:
            out.append(f"latency: not measured: {lat.get('reason') or 'unknown reason'}")
        else:
            runs = sorted({s.get("runs") for s in settings})
            n = f"{runs[0]}" if len(runs) == 1 else "/".join(map(str, runs))
            out.append(
                f"latency (onnxruntime CPU, {lat.get('graph_optimization', 'ORT_ENABLE_ALL')}, "
                f"{lat.get('order', 'interleaved')}, median of {n} runs):"
            )
            for s in settings:
                a, b, t = s["original"], s["candidate"], s["threads"]
                ratio = f"{s['ratio']:.2f}x" if s.get("ratio") is not None else "-"
                out.append(
                    f"  {t} thread{'s' if t != 1 else ''}: {_ms(a['median_ms'])} -> {_ms(b['median_ms'])} ms "
                    f"({ratio}), p10-p90 {_ms(a['p10_ms'])}-{_ms(a['p90_ms'])} -> "
                    f"{_ms(b['p10_ms'])}-{_ms(b['p90_ms'])}"
                )
            source, desc = lat.get("feeds"), lat.get("feeds_description") or ""
            if source:
                text = desc if source == "synthetic" and desc else f"first {source} sample, {desc}" if desc else source
                out.append(f"  feeds: {text}")
    return out


def _ms(v) -> str:
    if v is None:
        return "-"
    v = float(v)
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}" if v >= 1 else f"{v:.3f}"


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
