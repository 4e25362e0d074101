"""``optimize --auto`` on the real-model set at a 1-point budget of the model's own task agreement.

For each model of ``bench/out/real_models/manifest.json``: ``onnxslim optimize M -o OUT --auto --calib CALIB
--check-data EVAL --budget 0.01 --metric task_metric_<model>.py:agreement`` as a user runs it (wall time and peak
RSS of the whole command, workers included), then from its JSON report: the chosen model's size and latency
ratios and agreement, and the best single technique (every layer at one level) within the same budget.
Writes ``bench/out/auto/results.json`` and the ``## Automatic compression on real pretrained models`` section of
bench/RESULTS.md.

    .venv/bin/python bench/auto/run_auto.py [--models a,b] [--onnxslim PATH] [--report-only] [-- extra flags]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "bench")]
import int8_report  # noqa: E402
from run_nncf_qwac import eval_split  # noqa: E402

OUT = ROOT / "bench" / "out" / "auto"
REAL = ROOT / "bench" / "out" / "real_models"
HEADING = "## Automatic compression on real pretrained models"


def _one(entry: dict, onnxslim: str, extra: list[str]) -> dict:
    d, name = REAL / entry["name"], entry["name"]
    OUT.mkdir(parents=True, exist_ok=True)
    metric = OUT / f"task_metric_{name}.py"
    text = Path(__file__).with_name("task_metric.py").read_text()  # the copy lives elsewhere: pin the repo root
    metric.write_text(text.replace("Path(__file__).resolve().parents[2]", repr(str(ROOT)).join(["Path(", ")"]), 1))
    dst, report = OUT / f"{name}.onnx", OUT / f"{name}.report.json"
    cmd = [onnxslim, "optimize", str(d / "model.onnx"), "-o", str(dst), "--auto", "--budget", "0.01"]
    ev = eval_split(d)
    cmd += ["--calib", str(d / "calib"), "--check-data", str(ev), "--metric", f"{metric}:agreement"]
    cmd += ["--report", str(report), "-q", *extra]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    row = {"model": name, "rc": p.returncode, "seconds": round(time.perf_counter() - t0)}
    row["eval_split"], row["eval_feeds"] = ev.name, len(list(ev.glob("*.npz")))
    row["peak_rss_mb_children"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
    if not report.exists():
        row["error"] = (p.stderr.strip().splitlines() or [""])[-1][:300]
        return row
    auto = json.loads(report.read_text())["auto"]
    cands = [c for c in auto["candidates"] if "size_ratio" in c]
    chosen = next(c for c in cands if c["id"] == auto["chosen"])
    singles_all = [c for c in cands if c["source"] == "single"]
    singles = [c for c in singles_all if c["meets_budget"]]
    best_single = min(singles, key=lambda c: c["size_ratio"]) if singles else None
    row.update(
        passed=auto["passed"],
        chosen=chosen["summary"],
        size_ratio=round(chosen["size_ratio"], 3),
        latency_ratio=chosen.get("latency_ratio"),
        agreement=round(chosen["value"], 4),
        best_single=best_single["label"] if best_single else None,
        best_single_size_ratio=round(best_single["size_ratio"], 3) if best_single else None,
        best_single_agreement=round(best_single["value"], 4) if best_single else None,
        singles={
            c["label"]: [round(c["size_ratio"], 3), round(c["value"], 4)] for c in cands if c["source"] == "single"
        },
        candidates=len(auto["candidates"]),
        search_seconds=round(auto["search_seconds"]),
        stage_seconds={k: round(v) for k, v in auto.get("stage_seconds", {}).items()},
        peak_rss_mb=round(auto["peak_rss_mb"]),
        layers=len(auto["layers"]),
        levels=auto["levels"],
    )
    return row


def _nncf_rows() -> dict[str, dict]:
    path = OUT / "nncf_qwac.json"
    return {r["model"]: r for r in json.loads(path.read_text())} if path.exists() else {}


def _onnxsim_cell(model: str) -> str:
    """onnxsim's budget sweep for one model: the smallest result within the task budget, else the most agreeing."""
    path = OUT / "onnxsim_budget.json"
    rows = [r for r in (json.loads(path.read_text()) if path.exists() else []) if r["model"] == model]
    if not rows:
        return "not run"
    ok = [r for r in rows if "error" not in r]
    if not ok:
        return f"failed: {rows[0]['error'][:80]}"
    within = [r for r in ok if r["meets_budget"]]
    r = min(within, key=lambda r: r["size_ratio"]) if within else max(ok, key=lambda r: r["agreement"])
    return (
        f"{r['size_ratio']:.3f}x / {r['latency_ratio']:.2f}x / {r['agreement']:.4f}"
        f"{'' if within else ' (over budget)'} / {r['seconds']:.0f} (its budget {r['onnxsim_budget']}, "
        f"{len(ok)} of {len(rows)} ran)"
    )


def _section(rows: list[dict]) -> str:
    m = int8_report.machine()
    flags = " ".join(f for f in ("avx2", "avx512_vnni", "avx_vnni") if f in Path("/proc/cpuinfo").read_text())
    nncf = _nncf_rows()
    menus = sorted({", ".join(r.get("levels") or ["int8", "share4", "share3", "share2"]) for r in rows})
    lines = [
        HEADING,
        "",
        f"`bench/auto/run_auto.py`, {m['cpu']}, {m['nproc']} cores, {m['ram']}, CPU flags: {flags}, {m['date']}. "
        "`optimize --auto --budget 0.01` with each model's own task agreement "
        "(`bench/real_models/decisions.py`) as `--metric`, judged on held-out feeds (`eval_more` from "
        "`prepare_more_eval.py` where the model has it, else `eval`); levels "
        f"{' / '.join(menus)} (plus the int8 revert track). Best single = the smallest every-layer-at-one-level "
        "candidate within the budget. NNCF = `nncf.quantize_with_accuracy_control` "
        "(`bench/auto/run_nncf_qwac.py`, same calibration "
        "and evaluation feeds, same agreement as `validation_fn`, `max_drop=0.01`), its agreement recomputed on "
        "those feeds; onnxsim = onnxsim 0.8.1 `apply_optimization_pipeline` (`bench/auto/run_onnxsim_budget.py`; "
        "its budget is output L2 drift, swept, each result judged by the same agreement); latency = 1 thread, "
        "ratio to fp32.",
        "",
        "| model | eval feeds | chosen (layers per level) | size | latency | agreement | best single within budget "
        "| ratio | wall s | peak RSS MB | NNCF accuracy control: size / latency / agreement / s "
        "| onnxsim budget pipeline: size / latency / agreement / s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        n = nncf.get(r["model"])
        if n is None:
            peer = "not run"
        elif "error" in n:
            peer = f"failed: {n['error'][:80]}"
        else:
            peer = (
                f"{n['size_ratio']:.3f}x / {n['latency_ratio']:.2f}x / {n['agreement']:.4f}"
                f"{'' if n['meets_budget'] else ' (over budget)'} / {n['seconds']:.0f}"
            )
        if "size_ratio" not in r:
            lines.append(
                f"| {r['model']} | | failed: {r.get('error', '')} | | | | | | {r['seconds']} | | {peer} "
                f"| {_onnxsim_cell(r['model'])} |"
            )
            continue
        bs = r["best_single"]
        ratio = f"{r['best_single_size_ratio'] / r['size_ratio']:.2f}x smaller" if bs else "none passes"
        lat = f"{r['latency_ratio']:.2f}x" if r.get("latency_ratio") else "-"
        verdict = "" if r["passed"] else " (over budget: best found)"
        lines.append(
            f"| {r['model']} | {r.get('eval_feeds', '')} | {r['chosen']}{verdict} | {r['size_ratio']:.3f}x | {lat} "
            f"| {r['agreement']:.4f} | {bs or '-'} {r['best_single_size_ratio'] or ''} / "
            f"{r['best_single_agreement'] or ''} | {ratio} | {r['seconds']} | {r['peak_rss_mb']} | {peer} "
            f"| {_onnxsim_cell(r['model'])} |"
        )
    lines += ["", "Each level alone on every layer (size ratio / agreement):", ""]
    for r in rows:
        if r.get("singles"):
            cells = ", ".join(f"{k} {v[0]:.3f}x / {v[1]:.4f}" for k, v in r["singles"].items())
            lines.append(f"- {r['model']}: {cells}")
    timed = [r for r in rows if r.get("stage_seconds")]
    if timed:
        lines += ["", "Where each search's wall time went (seconds per stage, from the report's `stage_seconds`):", ""]
        for r in timed:
            cells = ", ".join(f"{k} {v}" for k, v in r["stage_seconds"].items())
            lines.append(f"- {r['model']}: {cells} ({r.get('candidates', '?')} candidates)")
    notes = Path(__file__).with_name("RESULTS_NOTES.md")
    if notes.exists():  # what the figures mean, written by whoever ran them
        lines += ["", notes.read_text().strip()]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models")
    ap.add_argument("--onnxslim", default=str(ROOT / ".venv" / "bin" / "onnxslim"))
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("extra", nargs="*")
    a = ap.parse_args()
    entries = json.loads((REAL / "manifest.json").read_text())["models"]
    if a.models:
        entries = [e for e in entries if e["name"] in a.models.split(",")]
    res_path = OUT / "results.json"
    old = {r["model"]: r for r in json.loads(res_path.read_text())} if res_path.exists() else {}
    if not a.report_only:
        for e in entries:
            row = _one(e, a.onnxslim, a.extra)
            old[row["model"]] = row
            print(json.dumps(row), flush=True)
            OUT.mkdir(parents=True, exist_ok=True)
            res_path.write_text(json.dumps(list(old.values()), indent=1))
    int8_report.write_section(ROOT / "bench" / "RESULTS.md", _section(list(old.values())), heading=HEADING)


if __name__ == "__main__":
    main()
