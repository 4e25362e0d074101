"""int8 on the real-model set: agreement with the original's decisions, size, latency, quantization cost.

For every model of ``bench/out/real_models/manifest.json`` (made by ``prepare.py``): ``onnxslim optimize M -o OUT
--quantize int8 --calib CALIB`` as a user runs it (wall time and peak RSS of the process), then on the held-out
feeds: task agreement with the fp32 model's decisions (``decisions.py``), output cosine, file size ratio, and
onnxruntime latency ratio int8 / fp32 at 1 and 2 threads (default optimizations, runs interleaved, medians of
repeated passes over the first 8 feeds after a warm-up). Writes ``bench/out/real_models/results_int8.json`` and the
``## int8 on real pretrained models`` section of bench/RESULTS.md.

    bash bench/real_models/setup.sh                    # once: venv, packages, inputs, feeds
    .venv/bin/python bench/real_models/run_real.py [--models a,b] [--report-only]
    .venv/bin/python bench/real_models/run_real.py --variant opset13 --cli-args "--opset 13"   # a section of its own
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "bench" / "real_models"))
import int8_report  # noqa: E402
from decisions import agreement, eval_split  # noqa: E402
from run_int8 import _load_npz_dir, _quant_cmd  # noqa: E402
from run_int8 import _session as _ort_session  # noqa: E402

from onnxslim.passes.quantize._hardware import host_target  # noqa: E402  (the CPU class this run measures)

OUT = ROOT / "bench" / "out" / "real_models"
HEADING = "## int8 on real pretrained models"


def _feeds(folder: Path) -> list[dict[str, np.ndarray]]:
    return _load_npz_dir(str(folder))


def _session(path: Path, threads: int) -> ort.InferenceSession:
    return _ort_session(str(path), threads)


def _latency_ratio(fp32: Path, int8: Path, feeds: list[dict], threads: int, rounds: int = 15) -> float:
    a, b = _session(fp32, threads), _session(int8, threads)
    feeds = feeds[:8]
    times: dict[str, list[float]] = {"f": [], "q": []}
    for k in range(rounds + 1):  # round 0 warms up; the two models alternate which goes first
        for tag, s in (("f", a), ("q", b)) if k % 2 == 0 else (("q", b), ("f", a)):
            t0 = time.perf_counter()
            for f in feeds:
                s.run(None, f)
            if k:
                times[tag].append(time.perf_counter() - t0)
    return float(np.median(times["q"]) / np.median(times["f"]))


def _cosine(ref: list[list[np.ndarray]], cand: list[list[np.ndarray]]) -> float:
    r = np.concatenate([x[0].astype(np.float64).reshape(-1) for x in ref])
    c = np.concatenate([x[0].astype(np.float64).reshape(-1) for x in cand])
    return float(r @ c / max(np.linalg.norm(r) * np.linalg.norm(c), 1e-30))


def _quantize(src: Path, dst: Path, calib: Path, extra: list[str]) -> dict:
    """The CLI as a user runs it, under a parent of its own so its peak RSS is its alone."""
    cmd = [*_quant_cmd("ours", src, dst, calib), "-q", *extra]  # the same command as bench/run_int8.py
    probe = (
        "import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(p.returncode)"
    )
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True)
    row = {"rc": p.returncode, "quant_s": round(time.perf_counter() - t0, 1)}
    err = p.stderr.strip().splitlines()
    row["quant_peak_rss_mb"] = round(int(err[-1]) / 1024) if err and err[-1].isdigit() else None
    if p.returncode:
        row["error"] = ([line for line in err[:-1] if line.strip()] or [p.stdout.strip()])[-1][:300]
    return row


def run(names: list[str] | None, variant: str = "", extra: list[str] | None = None) -> dict:
    manifest = json.loads((OUT / "manifest.json").read_text())
    rows = []
    for entry in manifest["models"]:
        if names and entry["name"] not in names:
            continue
        d = OUT / entry["name"]
        src, dst = d / "model.onnx", OUT / f"int8{'_' + variant if variant else ''}" / f"{entry['name']}.onnx"
        dst.parent.mkdir(parents=True, exist_ok=True)
        row = {
            "model": entry["name"],
            "task": entry["task"],
            "package": entry["package"],
            "bytes_fp32": src.stat().st_size,
            **_quantize(src, dst, d / "calib", extra or []),
        }
        if row["rc"] == 0:
            feeds = _feeds(eval_split(d))
            ref_s, q_s = _session(src, 1), _session(dst, 1)
            ref = [ref_s.run(None, f) for f in feeds]
            cand = [q_s.run(None, f) for f in feeds]
            row.update(
                bytes_int8=dst.stat().st_size,
                size_ratio=round(dst.stat().st_size / src.stat().st_size, 3),
                agreement=round(agreement(entry, ref, cand), 4),
                cosine=round(_cosine(ref, cand), 6),
                latency_ratio_1t=round(_latency_ratio(src, dst, feeds, 1), 3),
                latency_ratio_2t=round(_latency_ratio(src, dst, feeds, 2), 3),
                n_eval=len(feeds),
            )
        print(row, flush=True)
        rows.append(row)
    return {"machine": {**int8_report.machine(), "flags": _cpu_flags()}, "onnxruntime": ort.__version__, "rows": rows}


def _cpu_flags() -> str:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
    return ", ".join(f for f in wanted if f in flags) or "none of " + "/".join(wanted)


def _heading(variant: str, extra: list[str], target: str = "") -> str:
    """One section per CPU class (int8 kernels differ: VNNI or not) and per variant."""
    where = f", {target}" if target else ""
    return HEADING + (f" ({variant}: `{' '.join(extra)}`{where})" if variant else f" ({target})" if target else "")


def render(data: dict) -> str:
    m = data["machine"]
    lines = [
        _heading(data.get("variant", ""), data.get("cli_args", []), data.get("target", "")),
        "",
        "Generated by `bench/real_models/run_real.py` (do not edit by hand).",
        "",
        f"Machine: {m['nproc']} CPUs ({m['cpu']}; flags: {m['flags']}), {m['ram']}; onnxruntime "
        f"{data['onnxruntime']}; {m['date']}. Pretrained models shipped in PyPI wheels, with inputs recorded "
        "from the packages' own pipelines (`bench/real_models/prepare.py`); each quantized with `onnxslim "
        "optimize M -o OUT --quantize int8 --calib CALIB` (defaults; `target=auto` on this machine). Agreement "
        "is with the fp32 model's own decisions on the held-out feeds (`eval_more` where the model has it, else "
        "`eval`; `bench/real_models/decisions.py`); "
        "latency ratio = int8 / fp32 median, onnxruntime default optimizations.",
        "",
        "| model | task (package) | feeds | agreement | output cosine | size ratio | latency 1t | latency 2t | "
        "quant time | peak RSS |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        if r["rc"]:
            lines.append(
                f"| {r['model']} | {r['task']} ({r['package']}) | | exit {r['rc']}: {r.get('error', '')} | | | | | | |"
            )
            continue
        rss = f"{r['quant_peak_rss_mb']} MB" if r.get("quant_peak_rss_mb") else "-"
        lines.append(
            f"| {r['model']} | {r['task']} ({r['package']}) | {r.get('n_eval', '')} | {r['agreement']:.4f} | "
            f"{r['cosine']:.6f} | "
            f"{r['size_ratio']:.3f} | {r['latency_ratio_1t']:.3f} | {r['latency_ratio_2t']:.3f} | "
            f"{r['quant_s']:.1f} s | {rss} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", help="comma list of model names (default: all)")
    ap.add_argument("--report-only", action="store_true", help="re-render from results_int8.json")
    ap.add_argument("--variant", default="", help="a name for a run with extra CLI arguments (its own section)")
    ap.add_argument("--cli-args", default="", help="extra arguments for `onnxslim optimize`, e.g. '--opset 13'")
    args = ap.parse_args()
    extra = args.cli_args.split()
    if extra and not args.variant:
        ap.error("--cli-args needs a --variant name (the default section is the plain CLI)")
    path = OUT / f"results_int8{'_' + args.variant if args.variant else ''}.json"
    if args.report_only:
        data = json.loads(path.read_text())
    else:
        data = run(args.models.split(",") if args.models else None, args.variant, extra)
        data.update(variant=args.variant, cli_args=extra, target=host_target())
        if args.models and path.exists():  # a partial run replaces its models' rows and keeps the others
            fresh = {r["model"] for r in data["rows"]}
            data["rows"] = [r for r in json.loads(path.read_text())["rows"] if r["model"] not in fresh] + data["rows"]
        path.write_text(json.dumps(data, indent=1))
    heading = _heading(data.get("variant", ""), data.get("cli_args", []), data.get("target", ""))
    int8_report.write_section(ROOT / "bench" / "RESULTS.md", render(data), heading=heading)


if __name__ == "__main__":
    main()
