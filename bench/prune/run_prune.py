"""Pruning on the real-model set: ours (`onnxslim optimize --prune...`) vs onnxsim 0.8.1's pruning API.

For every model of ``bench/out/real_models/manifest.json`` (made by ``bench/real_models/prepare.py``) and every
variant of ``VARIANTS`` (expanded over the levels): produce the pruned model in a subprocess of its own, as a user
runs it (wall time and peak RSS from ``/usr/bin/time -v``), then on the held-out eval feeds measure task agreement
with the ORIGINAL model's decisions (``decisions.agreement``), output cosine, on-disk size ratio (.onnx + external
data), zip (deflate) size ratio, weight zeros and parameter counts, and onnxruntime latency ratio pruned /
original at 1 and 2 threads (``run_real._latency_ratio``: interleaved medians). Results are cached per
(model, variant) in ``bench/out/prune/results.json``; a rerun skips what is done (unless the variant's command
changed, or ``--force``). Writes the ``## Pruning on real pretrained models`` section of bench/RESULTS.md and,
via ``plot_prune.py`` (matplotlib, in bench/.venv-real), the plots.

    .venv/bin/python bench/prune/run_prune.py                       # every model, every default variant
    .venv/bin/python bench/prune/run_prune.py --models ocr_cls_mobilenetv3 --variants 'ours-lossless,onnxsim-*' \
        --levels 0.5 --channel-levels 0.3
    .venv/bin/python bench/prune/run_prune.py --list                # the expanded variant table
    .venv/bin/python bench/prune/run_prune.py --report-only         # re-render RESULTS.md + plots from the JSON
"""

from __future__ import annotations

import argparse
import datetime as dt
import fnmatch
import importlib.metadata as md
import io
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import onnx
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "bench" / "real_models"), str(HERE)]
import int8_report  # noqa: E402
from decisions import agreement  # noqa: E402
from peer_onnxsim_prune import _dead, _weights  # noqa: E402
from run_int8 import _run_timed  # noqa: E402
from run_real import _cosine, _cpu_flags, _feeds, _latency_ratio, _session  # noqa: E402

REAL = ROOT / "bench" / "out" / "real_models"
OUT = ROOT / "bench" / "out" / "prune"
RESULTS = OUT / "results.json"
OURS_CLI = ROOT / ".venv" / "bin" / "onnxslim"
PEER_PY = ROOT / "bench" / ".venv-peers" / "bin" / "python"
PEER_SCRIPT = HERE / "peer_onnxsim_prune.py"
PLOT_PY = ROOT / "bench" / ".venv-real" / "bin" / "python"
HEADING = "## Pruning on real pretrained models"
TARGETS = "50% unstructured: agreement >= 0.98 at file <= 0.62x; 30% channels: latency <= 0.77x at agreement >= 0.95"

# ------------------------------------------------------------------------------------------------ the variants
# One dict per variant; edit the flags here when the CLI changes (a cached row whose command differs is redone).
#   name     base name; an instance is "<name>@<level>" (or just <name> when levels is None)
#   tool     "ours" (args appended to `onnxslim optimize M -o OUT -q --report R`) or "peer" (args appended to
#            `bench/.venv-peers/bin/python -I peer_onnxsim_prune.py --model M --out OUT`)
#   method   the plot line / table group; ours and the peer share a method name where they do the same thing
#   axis     "sparsity" (fraction of weights), "channels" (fraction of channels) or "none"
#   levels   "S" (--levels), "F" (--channel-levels), "NM" (--nm, level = 1 - n/m) or None
#   args     placeholders: {level} {nm} {calib}
#   default  part of a plain run (False: only when named with --variants)
VARIANTS: list[dict] = [
    {"name": "ours-lossless", "tool": "ours", "method": "lossless", "axis": "none", "levels": None, "args": []},
    {
        "name": "ours-magnitude",
        "tool": "ours",
        "method": "magnitude",
        "axis": "sparsity",
        "levels": "S",
        "args": ["--prune", "{level}", "--prune-option", "importance=magnitude", "--prune-option", "reconstruct=none"],
    },
    {
        "name": "ours-wanda",
        "tool": "ours",
        "method": "wanda",
        "axis": "sparsity",
        "levels": "S",
        "args": [
            "--prune",
            "{level}",
            "--calib",
            "{calib}",
            "--prune-option",
            "importance=wanda",
            "--prune-option",
            "reconstruct=none",
            "--prune-option",
            "allocation=uniform",
        ],
    },
    {
        "name": "ours-sparsegpt",
        "tool": "ours",
        "method": "sparsegpt",
        "axis": "sparsity",
        "levels": "S",
        "args": ["--prune", "{level}", "--calib", "{calib}"],
    },
    {
        "name": "ours-sparsegpt-uniform",
        "tool": "ours",
        "method": "sparsegpt-uniform",
        "axis": "sparsity",
        "levels": "S",
        "args": ["--prune", "{level}", "--calib", "{calib}", "--prune-option", "allocation=uniform"],
    },
    {
        "name": "ours-nm",
        "tool": "ours",
        "method": "nm",
        "axis": "sparsity",
        "levels": "NM",
        "args": ["--prune-nm", "{nm}", "--calib", "{calib}"],
    },
    {
        "name": "ours-channels",
        "tool": "ours",
        "method": "channels",
        "axis": "channels",
        "levels": "F",
        "args": ["--prune-channels", "{level}", "--calib", "{calib}", "--prune-option", "recovery=none"],
    },
    {
        "name": "ours-channels-recovery",
        "tool": "ours",
        "method": "channels+recovery",
        "axis": "channels",
        "levels": "F",
        "args": ["--prune-channels", "{level}", "--calib", "{calib}"],
    },
    {
        "name": "onnxsim-simplify",
        "tool": "peer",
        "method": "lossless",
        "axis": "none",
        "levels": None,
        "args": ["--method", "none", "--simplify-first"],
    },
    # onnxsim 0.8.1 on the onnxsim.simplify()'d model (its own pipeline first, as ours runs its lossless one):
    # its Wanda/SparseGPT/structured calls do nothing to weights held in Constant nodes (the raw Paddle models).
    {
        "name": "onnxsim-magnitude",
        "tool": "peer",
        "method": "magnitude",
        "axis": "sparsity",
        "levels": "S",
        "args": ["--method", "magnitude", "--sparsity", "{level}", "--simplify-first"],
    },
    {
        "name": "onnxsim-wanda",
        "tool": "peer",
        "method": "wanda",
        "axis": "sparsity",
        "levels": "S",
        "args": ["--method", "wanda", "--sparsity", "{level}", "--calib", "{calib}", "--simplify-first"],
    },
    {
        "name": "onnxsim-sparsegpt",
        "tool": "peer",
        "method": "sparsegpt",
        "axis": "sparsity",
        "levels": "S",
        "args": ["--method", "sparsegpt", "--sparsity", "{level}", "--calib", "{calib}", "--simplify-first"],
    },
    {
        "name": "onnxsim-nm",
        "tool": "peer",
        "method": "nm",
        "axis": "sparsity",
        "levels": "NM",
        "args": ["--method", "nm", "--nm", "{nm}", "--calib", "{calib}", "--simplify-first"],
    },
    {
        "name": "onnxsim-structured",
        "tool": "peer",
        "method": "channels",
        "axis": "channels",
        "levels": "F",
        "args": ["--method", "structured", "--sparsity", "{level}", "--calib", "{calib}", "--simplify-first"],
    },
    {
        "name": "onnxsim-structured-finetune",
        "tool": "peer",
        "method": "channels+recovery",
        "axis": "channels",
        "levels": "F",
        "args": [
            "--method",
            "structured",
            "--sparsity",
            "{level}",
            "--calib",
            "{calib}",
            "--simplify-first",
            "--finetune",
        ],
    },
    # the same calls on the model as shipped, no onnxsim.simplify first (only when asked for: 'onnxsim-raw-*')
    *[
        {
            "name": f"onnxsim-raw-{m}",
            "tool": "peer",
            "method": m if m != "structured" else "channels",
            "axis": "channels" if m == "structured" else "sparsity",
            "levels": {"nm": "NM", "structured": "F"}.get(m, "S"),
            "args": [
                "--method",
                m,
                *(["--nm", "{nm}"] if m == "nm" else ["--sparsity", "{level}"]),
                *(["--calib", "{calib}"] if m != "magnitude" else []),
            ],
            "default": False,
        }
        for m in ("magnitude", "wanda", "sparsegpt", "nm", "structured")
    ],
]


def expand(levels: list[float], channel_levels: list[float], nms: list[str]) -> list[dict]:
    out = []
    for v in VARIANTS:
        if v["levels"] is None:
            out.append({**v, "variant": v["name"], "level": 0.0, "level_label": "-", "nm": None})
            continue
        if v["levels"] == "NM":
            for p in nms:
                n, m = (int(x) for x in p.split(":"))
                out.append(
                    {**v, "variant": f"{v['name']}@{p}", "level": round(1 - n / m, 4), "level_label": p, "nm": p}
                )
            continue
        for x in levels if v["levels"] == "S" else channel_levels:
            out.append({**v, "variant": f"{v['name']}@{x:g}", "level": x, "level_label": f"{x:g}", "nm": None})
    return out


def select(variants: list[dict], patterns: str | None) -> list[dict]:
    if not patterns:
        return [v for v in variants if v.get("default", True)]
    pats = [p.strip() for p in patterns.split(",") if p.strip()]
    return [
        v
        for v in variants
        if any(
            fnmatch.fnmatchcase(v["variant"], p) or fnmatch.fnmatchcase(v["name"], p) or p == v["tool"] for p in pats
        )
    ]


def _args(v: dict, calib: Path) -> list[str]:
    return [a.format(level=f"{v['level']:g}", nm=v["nm"] or "", calib=str(calib)) for a in v["args"]]


def _command(v: dict, src: Path, dst: Path, calib: Path) -> list[str]:
    if v["tool"] == "ours":
        rep = dst.with_name(dst.stem + ".report.json")
        return [str(OURS_CLI), "optimize", str(src), "-o", str(dst), "-q", "--report", str(rep), *_args(v, calib)]
    return [str(PEER_PY), "-I", str(PEER_SCRIPT), "--model", str(src), "--out", str(dst), *_args(v, calib)]


def _spec(v: dict) -> dict:
    """What identifies a cached row's command (paths left out, so moving the checkout keeps the cache)."""
    return {"tool": v["tool"], "args": _args(v, Path("CALIB"))}


# ------------------------------------------------------------------------------------------------ measurements
def _files(path: Path) -> list[Path]:
    """The .onnx and every external data file it references."""
    m = onnx.load(str(path), load_external_data=False)
    locs = set()
    stack = [m.graph]
    while stack:
        g = stack.pop()
        for t in g.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                locs.update(e.value for e in t.external_data if e.key == "location")
        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    stack.append(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    stack.extend(a.graphs)
                elif a.type == onnx.AttributeProto.TENSOR and a.t.data_location == onnx.TensorProto.EXTERNAL:
                    locs.update(e.value for e in a.t.external_data if e.key == "location")
    return [path, *(path.parent / loc for loc in sorted(locs))]


def _sizes(path: Path) -> tuple[int, int]:
    """(bytes on disk, bytes of a zip archive of the same files, deflate at zipfile's default level)."""
    files = _files(path)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for i, f in enumerate(files):  # the same member names for every model: only the contents differ
            z.write(f, arcname="model.onnx" if i == 0 else f"model.data{i}")
    return sum(f.stat().st_size for f in files), buf.tell()


def _weight_stats(path: Path) -> dict:
    m = onnx.load(str(path))
    w = _weights(m)
    dead_c, dead_i = _dead(m)
    return {
        "params": int(sum(a.size for a in w.values())),
        "zeros": int(sum(int((a == 0).sum()) for a in w.values())),
        "dead_weights": dead_c + dead_i,
        "nodes": sum(1 for _ in m.graph.node),
    }


class Reference:
    """The original model of one manifest entry: its eval feeds and outputs, sizes and weight stats (once)."""

    def __init__(self, entry: dict):
        self.entry = entry
        d = REAL / entry["name"]
        self.src, self.calib, self.eval = d / "model.onnx", d / "calib", d / "eval"
        self.feeds = _feeds(self.eval)
        sess = _session(self.src, 1)
        self.outputs = [sess.run(None, f) for f in self.feeds]
        self.bytes, self.zip_bytes = _sizes(self.src)
        self.weights = _weight_stats(self.src)
        self.aa: dict | None = None

    def noise(self, rounds: int, repeats: int) -> dict:
        """A/A: the latency ratio of the original against itself, the floor any latency ratio should be read on."""
        if self.aa is None:
            lat = _latency(self.src, self.src, self.feeds, rounds, repeats)
            self.aa = {
                "1t": lat["latency_ratio_1t"],
                "2t": lat["latency_ratio_2t"],
                "samples_1t": lat["latency_samples_1t"],
                "samples_2t": lat["latency_samples_2t"],
            }
        return self.aa


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:400] if lines else "failed without output"


def _latency(a: Path, b: Path, feeds: list[dict], rounds: int, repeats: int) -> dict:
    """run_real's interleaved latency ratio b / a at 1 and 2 threads, `repeats` times: the median, and the samples."""
    out = {}
    for t in (1, 2):
        xs = sorted(round(_latency_ratio(a, b, feeds, t, rounds), 3) for _ in range(max(1, repeats)))
        out[f"latency_ratio_{t}t"] = xs[len(xs) // 2]
        out[f"latency_samples_{t}t"] = xs
    return out


def measure(ref: Reference, v: dict, timeout: float, rounds: int, keep: bool, repeats: int = 3) -> dict:
    dst = OUT / ref.entry["name"] / f"{v['variant'].replace(':', '-')}.onnx"
    dst.parent.mkdir(parents=True, exist_ok=True)
    for old in dst.parent.glob(dst.stem + ".*"):  # the model, its data, its report from an earlier run
        old.unlink()
    cmd = _command(v, ref.src, dst, ref.calib)
    row = {
        "model": ref.entry["name"],
        "variant": v["variant"],
        "name": v["name"],
        "tool": v["tool"],
        "method": v["method"],
        "axis": v["axis"],
        "level": v["level"],
        "level_label": v["level_label"],
        "spec": _spec(v),
        "cmd": " ".join(cmd).replace(str(ROOT) + "/", ""),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    res = _run_timed(cmd, timeout)
    row.update(rc=res["rc"], prune_s=round(res["wall_s"], 2), prune_peak_rss_mb=res["peak_rss_mb"])
    if res["info"]:
        row["peer_info"] = res["info"]
    if res["rc"] != 0:
        row["error"] = _last_line(res["stderr_tail"])
        if res["error"] and res["error"] != row["error"]:
            row["error_line"] = res["error"]
        return row
    if not dst.exists():
        row.update(rc=-1, error="exited 0 but wrote no output file")
        return row
    rep = dst.with_name(dst.stem + ".report.json")
    if rep.exists():
        try:
            rj = json.loads(rep.read_text())
            row["warnings"] = [str(w)[:300] for w in rj.get("warnings", [])][:5]
            row["ours_passes"] = [  # what the pruning passes report they did (and what they skipped)
                {
                    "name": p.get("name"),
                    "modified": p.get("modified"),
                    "stats": p.get("stats"),
                    "skipped": len(p.get("skipped") or []),
                }
                for p in rj.get("passes", [])
                if str(p.get("name", "")).startswith(("prune", "pack"))
            ]
        except (OSError, ValueError):
            pass
    nbytes, zbytes = _sizes(dst)
    w = _weight_stats(dst)
    row.update(
        bytes=nbytes,
        size_ratio=round(nbytes / ref.bytes, 4),
        zip_bytes=zbytes,
        zip_ratio=round(zbytes / ref.zip_bytes, 4),
        params_ratio=round(w["params"] / max(ref.weights["params"], 1), 4),
        weight_zero_frac=round(w["zeros"] / max(w["params"], 1), 4),
        dead_weights=w["dead_weights"],
        nodes=w["nodes"],
        nodes_original=ref.weights["nodes"],
    )
    try:
        sess = _session(dst, 1)
        cand = [sess.run(None, f) for f in ref.feeds]
        row.update(
            agreement=round(agreement(ref.entry, ref.outputs, cand), 4),
            cosine=round(_cosine(ref.outputs, cand), 6),
            n_eval=len(ref.feeds),
        )
        row.update(_latency(ref.src, dst, ref.feeds, rounds, repeats))
    except Exception as e:  # noqa: BLE001 -- an output that does not run is a result
        row["eval_error"] = _last_line(f"{type(e).__name__}: {e}")
    if not keep:
        for f in _files(dst):
            f.unlink(missing_ok=True)
    return row


# ------------------------------------------------------------------------------------------------ cache + report
def load_results() -> dict:
    if RESULTS.exists():
        return json.loads(RESULTS.read_text())
    return {"rows": []}


def save_results(data: dict) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(RESULTS)


def upsert(data: dict, row: dict) -> None:
    data["rows"] = [r for r in data["rows"] if (r["model"], r["variant"]) != (row["model"], row["variant"])]
    data["rows"].append(row)


def versions() -> dict:
    def dist(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "not installed"

    git = subprocess.run(["git", "log", "-1", "--format=%h"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    peer = "bench/.venv-peers missing"
    if PEER_PY.exists():
        code = (
            "import importlib.metadata as md; "
            "print(' '.join(f'{d} {md.version(d)}' for d in ('onnxsim', 'onnx', 'onnxruntime')))"
        )
        peer = subprocess.run([str(PEER_PY), "-I", "-c", code], capture_output=True, text=True, cwd=OUT).stdout.strip()
    return {
        "ours": f"onnxslim {dist('onnxslim')} (git {git}{' + uncommitted changes' if dirty else ''}), "
        f"onnx {dist('onnx')}, onnxruntime {ort.__version__}, numpy {dist('numpy')}",
        "peer": peer,
    }


def _fmt(v, f="{:.3f}") -> str:
    return "-" if v is None else f.format(v)


def _mb(n) -> str:
    return "-" if n is None else (f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB")


def _note(r: dict) -> str:
    if r.get("rc"):
        return f"exit {r['rc']}: {r.get('error', '')}"
    if r.get("eval_error"):
        return f"output does not run: {r['eval_error']}"
    notes = []
    pi = r.get("peer_info") or {}
    if "weights_rewritten" in pi:
        notes.append(f"{pi['weights_rewritten']}/{pi['weights']} weights rewritten")
    an = pi.get("analysis")
    if an:
        notes.append(
            f"{an['chains']} chains, {an['channels_dropped']}/{an['channels_total']} ch, {an['not_eligible']} declined"
        )
    for p in r.get("ours_passes") or []:
        st = ", ".join(f"{k}={v}" for k, v in (p.get("stats") or {}).items() if not isinstance(v, (dict, list)))
        notes.append(f"{p['name']}: {st or 'no stats'}" + (f" ({p['skipped']} skipped)" if p.get("skipped") else ""))
    if pi.get("finetune_call"):
        notes.append("finetune: MatMul/Gemm layers only")
    if r.get("dead_weights"):
        notes.append(f"{r['dead_weights']} dead weights left in file")
    notes.extend(r.get("warnings") or [])
    return "; ".join(notes)


def _targets(rows: list[dict]) -> list[str]:
    """The issue's two targets, per model, for our variants only -- as measured."""
    out = []
    for model in sorted({r["model"] for r in rows}):
        mine = [
            r
            for r in rows
            if r["model"] == model and r["tool"] == "ours" and not r.get("rc") and r.get("agreement") is not None
        ]
        uns = [r for r in mine if r["axis"] == "sparsity" and r["method"] != "nm" and abs(r["level"] - 0.5) < 1e-9]
        ch = [r for r in mine if r["axis"] == "channels" and abs(r["level"] - 0.3) < 1e-9]
        parts = []
        if uns:
            ok = [r for r in uns if r["agreement"] >= 0.98 and r["size_ratio"] <= 0.62]
            best = max(uns, key=lambda r: (r["agreement"], -r["size_ratio"]))
            parts.append(
                f"50% unstructured {'MET' if ok else 'not met'} (best: {best['variant']} agreement "
                f"{best['agreement']:.4f}, file {best['size_ratio']:.3f}x)"
            )
        if ch:
            ok = [r for r in ch if r["latency_ratio_1t"] <= 0.77 and r["agreement"] >= 0.95]
            best = min(ch, key=lambda r: (r["agreement"] < 0.95, r["latency_ratio_1t"]))
            parts.append(
                f"30% channels {'MET' if ok else 'not met'} (best: {best['variant']} latency 1t "
                f"{best['latency_ratio_1t']:.3f}x, agreement {best['agreement']:.4f})"
            )
        out.append(f"- **{model}**: " + ("; ".join(parts) if parts else "no successful run of ours at 50% / 30%"))
    return out


def render(data: dict, manifest: dict) -> str:
    m = data.get("machine") or {}
    flags = m.get("flags", "")
    has = {f: ("yes" if f in flags.split(", ") else "no") for f in ("avx512_vnni", "avx_vnni")}
    ver = data.get("versions") or {}
    lines = [
        HEADING,
        "",
        "Generated by `bench/prune/run_prune.py` (do not edit by hand; see `bench/prune/README.md`).",
        "",
        f"Machine: {m.get('nproc')} cores, {m.get('cpu')} (avx512_vnni: {has['avx512_vnni']}, avx_vnni: "
        f"{has['avx_vnni']}; flags seen: {flags}), {m.get('ram')}; {m.get('date')}. Ours: {ver.get('ours')}. "
        f"Peer: {ver.get('peer')} (bench/.venv-peers, `bench/prune/peer_onnxsim_prune.py`).",
        "",
        "Each variant runs in a process of its own (prune time and peak RSS are that process's, from "
        "`/usr/bin/time -v`). Agreement is with the original model's own decisions on the held-out feeds "
        "(`bench/real_models/decisions.py`); cosine over the first output; size = .onnx + external data vs the "
        "original; zip = deflate-compressed size vs the original's; zeros = fraction of zero entries in the dense "
        "float weights (rank >= 2) that nodes read, params = their element count vs the original (weights our CLI "
        "stores packed are not dense floats: see the pass stats in the notes); latency = pruned / original, "
        "onnxruntime default optimizations, interleaved medians of "
        f"{(data.get('latency') or {}).get('rounds', 15)} rounds over the first 8 feeds (`run_real._latency_ratio`), "
        f"the median of {(data.get('latency') or {}).get('repeats', 3)} such ratios. The onnxsim rows run "
        "`onnxsim.simplify` first unless named `onnxsim-raw-*`.",
        "",
        f"Targets (from the issue): {TARGETS}",
        "",
        *_targets(data["rows"]),
        "",
        "Plots: [all models](prune/prune_grid.png); per model `bench/prune/<model>_agreement_vs_sparsity.png`.",
        "",
    ]
    order = {v["name"]: i for i, v in enumerate(VARIANTS)}
    for entry in manifest["models"]:
        rows = [r for r in data["rows"] if r["model"] == entry["name"]]
        if not rows:
            continue
        rows.sort(key=lambda r: (order.get(r["name"], 999), r["level"]))
        aa = (data.get("aa") or {}).get(entry["name"])
        lines += [
            f"### {entry['name']} -- {entry['task']} ({entry['package']})",
            "",
            *(
                [
                    f"A/A latency ratio (the original against itself, same timing): 1t {aa['1t']:.3f}, "
                    f"2t {aa['2t']:.3f} (samples {aa.get('samples_1t')}, {aa.get('samples_2t')}) -- the noise floor of "
                    "the latency columns.",
                    "",
                ]
                if aa
                else []
            ),
            "| variant | level | agreement | cosine | size | zip | zeros | params | latency 1t | latency 2t | "
            "prune time | peak RSS | notes |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            ok = not r.get("rc") and not r.get("eval_error")
            cells = [
                f"`{r['name']}`",
                r["level_label"],
                _fmt(r.get("agreement"), "{:.4f}") if ok else "-",
                _fmt(r.get("cosine"), "{:.5f}") if ok else "-",
                _fmt(r.get("size_ratio")),
                _fmt(r.get("zip_ratio")),
                _fmt(r.get("weight_zero_frac")),
                _fmt(r.get("params_ratio")),
                _fmt(r.get("latency_ratio_1t")),
                _fmt(r.get("latency_ratio_2t")),
                _fmt(r.get("prune_s"), "{:.1f} s"),
                _fmt(r.get("prune_peak_rss_mb"), "{:.0f} MB"),
                _note(r).replace("|", "\\|"),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot() -> None:
    if not PLOT_PY.exists():
        print(f"plots skipped: {PLOT_PY} missing (see bench/prune/README.md)")
        return
    p = subprocess.run([str(PLOT_PY), str(HERE / "plot_prune.py"), str(RESULTS)], capture_output=True, text=True)
    print((p.stdout + p.stderr).strip() or "plots written")


# ------------------------------------------------------------------------------------------------ driver
def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", help="comma list of model names (default: all in the manifest)")
    ap.add_argument(
        "--variants",
        help="comma list of fnmatch patterns on variant names ('ours-*', "
        "'onnxsim-wanda@0.5', 'onnxsim-raw-*'), or a tool ('ours', 'peer'); default: every default one",
    )
    ap.add_argument("--levels", default="0.3,0.5,0.7", help="unstructured sparsity levels S")
    ap.add_argument("--channel-levels", default="0.1,0.2,0.3", help="channel fractions F")
    ap.add_argument("--nm", default="2:4", help="comma list of N:M patterns")
    ap.add_argument("--force", action="store_true", help="redo (model, variant) pairs already in results.json")
    ap.add_argument("--retry-failed", action="store_true", help="redo cached rows that failed")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per pruning run")
    ap.add_argument("--rounds", type=int, default=15, help="latency rounds per thread count (after one warm-up)")
    ap.add_argument(
        "--latency-repeats",
        type=int,
        default=3,
        help="repeat each latency measurement this many times and keep the median ratio",
    )
    ap.add_argument("--no-keep", action="store_true", help="delete each pruned model once measured")
    ap.add_argument("--list", action="store_true", help="print the selected variants and their commands, then exit")
    ap.add_argument("--report-only", action="store_true", help="re-render RESULTS.md and the plots from the JSON")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument(
        "--results-md",
        default=str(ROOT / "bench" / "RESULTS.md"),
        help="the markdown file whose section is replaced (default bench/RESULTS.md)",
    )
    ap.add_argument("--no-results-md", action="store_true", help="do not touch any RESULTS.md")
    args = ap.parse_args()

    manifest = json.loads((REAL / "manifest.json").read_text())
    names = args.models.split(",") if args.models else [e["name"] for e in manifest["models"]]
    unknown = set(names) - {e["name"] for e in manifest["models"]}
    if unknown:
        ap.error(f"not in the manifest: {', '.join(sorted(unknown))}")
    variants = select(expand(_floats(args.levels), _floats(args.channel_levels), args.nm.split(",")), args.variants)
    if not variants and not args.report_only:
        ap.error("no variant matches --variants")
    if args.list:
        for v in variants:
            print(f"{v['variant']:40s} {' '.join(_command(v, Path('M'), Path('OUT'), Path('CALIB')))}")
        return

    data = load_results()
    if not args.report_only:
        data["machine"] = {**int8_report.machine(), "flags": _cpu_flags()}
        data["versions"] = versions()
        data["latency"] = {"rounds": args.rounds, "repeats": args.latency_repeats}
        for entry in manifest["models"]:
            if entry["name"] not in names:
                continue
            cached = {r["variant"]: r for r in data["rows"] if r["model"] == entry["name"]}
            todo = []
            for v in variants:
                old = cached.get(v["variant"])
                if (
                    old
                    and not args.force
                    and old.get("spec") == _spec(v)
                    and not (args.retry_failed and (old.get("rc") or old.get("eval_error")))
                ):
                    continue
                todo.append(v)
            print(f"[{entry['name']}] {len(todo)} to run, {len(variants) - len(todo)} cached", flush=True)
            if not todo:
                continue
            ref = Reference(entry)
            data.setdefault("aa", {})[entry["name"]] = ref.noise(args.rounds, args.latency_repeats)
            print(f"  A/A latency ratio (original vs itself): {data['aa'][entry['name']]}", flush=True)
            for v in todo:
                t0 = time.perf_counter()
                row = measure(ref, v, args.timeout, args.rounds, not args.no_keep, args.latency_repeats)
                upsert(data, row)
                save_results(data)
                print(
                    f"  {v['variant']:34s} rc={row['rc']} agree={row.get('agreement')} size={row.get('size_ratio')} "
                    f"zip={row.get('zip_ratio')} lat1={row.get('latency_ratio_1t')} lat2={row.get('latency_ratio_2t')} "
                    f"prune={row.get('prune_s')}s rss={row.get('prune_peak_rss_mb')}MB "
                    f"({time.perf_counter() - t0:.0f}s) {row.get('error') or row.get('eval_error') or ''}",
                    flush=True,
                )
    if not data["rows"]:
        print("no results yet")
        return
    if not args.no_results_md:
        int8_report.write_section(Path(args.results_md), render(data, manifest), heading=HEADING)
        print(f"section {HEADING!r} written to {args.results_md}")
    if not args.no_plot:
        plot()


if __name__ == "__main__":
    main()
