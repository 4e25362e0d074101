"""int8 on the real-model set, side by side: ours, ONNX Runtime quantize_static (MinMax, Percentile), NNCF, AIMET.

For every model of ``bench/out/real_models/manifest.json`` and every tool, one quantization at a time, each in its own
subprocess (wall time, peak RSS), with all of the model's ``calib`` feeds:

- ``ours``            ``onnxslim optimize M -o OUT --quantize int8 --calib CALIB`` (``run_real._quantize``, as
                      ``run_real.py`` runs it);
- ``ort-minmax``, ``ort-percentile``, ``nncf``   ``bench/run_int8.py``'s peer worker in ``bench/.venv-quant-peers``;
- ``aimet``           ``bench/quantize_with_aimet.py`` in ``bench/.venv-aimet`` (aimet-onnx QuantSim defaults,
                      QDQ export).

Then, in this (our) venv's onnxruntime: task agreement with the fp32 model's decisions on the held-out split
(``decisions.agreement`` on ``decisions.eval_split``), output cosine, size ratio, latency ratio int8 / fp32 at 1 and
2 threads (``run_real._latency_ratio``), and the first error line of a failure (a row, not a crash).  Writes
``bench/out/real_models/results_int8_peers.json`` and the ``## int8 on real pretrained models, side by side``
section of bench/RESULTS.md.

    bash bench/setup_quant_peers.sh && bash bench/setup_aimet.sh     # once: the peer venvs
    .venv/bin/python bench/real_models/run_real_peers.py [--models a,b] [--tools ours,aimet] [--report-only]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "bench" / "real_models"))
import int8_report  # noqa: E402
import quantize_with_aimet  # noqa: E402
import run_int8  # noqa: E402
import run_real  # noqa: E402
from decisions import agreement, eval_split  # noqa: E402

OUT = run_real.OUT
JSON_OUT = OUT / "results_int8_peers.json"
HEADING = "## int8 on real pretrained models, side by side"
TOOLS = ("ours", *run_int8.PEERS, quantize_with_aimet.PEER3)
RECIPES = {
    "ours": "`onnxslim optimize M -o OUT --quantize int8 --calib CALIB` (defaults)",
    "ort-minmax": "`quant_pre_process` + `quantize_static` (QDQ, per-channel, U8 activations, S8 weights, MinMax)",
    "ort-percentile": "the same with `CalibrationMethod.Percentile` (99.999)",
    "nncf": "`nncf.quantize(model, nncf.Dataset(feeds), subset_size=len(feeds))` (ONNX backend, defaults)",
    "aimet": "`fold_all_batch_norms_to_weight`, `QuantizationSimModel(param_type=int8, activation_type=int8, "
    "quant_scheme=min_max, config_file='default')` (per-channel weights), `compute_encodings(feeds)`, "
    "`to_onnx_qdq(prequantize_constants=True)` (U8 activations; `sim.export` + `encodings_to_onnx_qdq` where "
    "`to_onnx_qdq` fails on -1 input dims)",
}


def _quantize(tool: str, src: Path, dst: Path, calib: Path, timeout: float) -> dict:
    if tool == "ours":
        return run_real._quantize(src, dst, calib, [])
    res = run_int8._run_timed(quantize_with_aimet.quant_cmd(tool, src, dst, calib), timeout)
    row = {"rc": res["rc"], "quant_s": round(res["wall_s"], 1), "quant_peak_rss_mb": res["peak_rss_mb"]}
    if res["info"]:
        row["info"] = {k: v for k, v in res["info"].items() if k != "seconds_inside"}
    if res["rc"]:
        row["error"] = res["error"]
        if res["rc"] in (137, -9) and "TimeoutExpired" not in (res["error"] or ""):
            row["error"] = _oom_note(res["peak_rss_mb"]) or f"killed by SIGKILL at peak RSS {res['peak_rss_mb']} MB"
    return row


def _oom_note(rss_mb: float | None) -> str | None:
    """The kernel log's out-of-memory kill of a process of about this peak RSS, if the log says so."""
    import re
    import subprocess

    try:
        log = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for m in re.finditer(r"Out of memory: Killed process \d+ \((\S+)\).*?anon-rss:(\d+)kB", log):
        if rss_mb and abs(int(m.group(2)) / 1024 - rss_mb) <= 0.02 * rss_mb:
            mem = int8_report.machine()["ram"]
            return (
                f"killed by the kernel's out-of-memory killer at {int(m.group(2)) / 2**20:.1f} GiB RSS ({mem} machine)"
            )
    return None


def _evaluate(entry: dict, src: Path, dst: Path, feeds: list[dict], ref: list) -> dict:
    sess = run_real._session(dst, 1)
    cand = [sess.run(None, f) for f in feeds]
    row = {
        "bytes_int8": run_int8._size(dst),
        "size_ratio": round(run_int8._size(dst) / run_int8._size(src), 3),
        "agreement": round(agreement(entry, ref, cand), 4),
        "cosine": round(run_real._cosine(ref, cand), 6),
        **run_int8._op_summary(dst),
    }
    loads = [os.getloadavg()[0]]
    row["latency_ratio_1t"] = round(run_real._latency_ratio(src, dst, feeds, 1), 3)
    loads.append(os.getloadavg()[0])
    row["latency_ratio_2t"] = round(run_real._latency_ratio(src, dst, feeds, 2), 3)
    loads.append(os.getloadavg()[0])
    row["load_1m"] = [round(x, 2) for x in loads]  # at the start, between and after the two latency runs
    return row


def run(names: list[str] | None, tools: list[str], timeout: float) -> dict:
    manifest = json.loads((OUT / "manifest.json").read_text())
    rows, t_start, load_start = [], time.time(), os.getloadavg()
    for entry in manifest["models"]:
        if names and entry["name"] not in names:
            continue
        d = OUT / entry["name"]
        src = d / "model.onnx"
        feeds = run_real._feeds(eval_split(d))
        ref_s = run_real._session(src, 1)
        ref = [ref_s.run(None, f) for f in feeds]
        for tool in tools:
            dst = OUT / "int8_peers" / entry["name"] / tool / "model.onnx"
            shutil.rmtree(dst.parent, ignore_errors=True)
            dst.parent.mkdir(parents=True)
            row = {
                "model": entry["name"],
                "task": entry["task"],
                "package": entry["package"],
                "tool": tool,
                "n_eval": len(feeds),
                "load_before_quant": round(os.getloadavg()[0], 2),
                **_quantize(tool, src, dst, d / "calib", timeout),
            }
            if row["rc"] == 0 and not dst.exists():
                row.update(rc=-1, error="finished but wrote no output file")
            if row["rc"] == 0:
                try:
                    row.update(_evaluate(entry, src, dst, feeds, ref))
                except Exception as e:  # noqa: BLE001 -- an output onnxruntime cannot load or run is a row
                    msg = str(e).strip().splitlines()
                    row["eval_error"] = f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]
            print({k: v for k, v in row.items() if k not in ("task", "package")}, flush=True)
            rows.append(row)
    return {
        "machine": {**int8_report.machine(), "flags": run_real._cpu_flags()},
        "versions": {**run_int8._versions(), "aimet": quantize_with_aimet.versions()},
        "run_s": round(time.time() - t_start),
        "load_1m_start": round(load_start[0], 2),
        "load_1m_end": round(os.getloadavg()[0], 2),
        "tools": tools,
        "rows": rows,
    }


def _ok(r: dict) -> bool:
    return r["rc"] == 0 and "agreement" in r


def _peers_ok(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["tool"] != "ours" and _ok(r) and (r.get("q_nodes") or r.get("int8_weights"))]


def best_peer(rows: list[dict]) -> dict | None:
    """The peer with the highest agreement among outputs that quantized something; ties go to the lower 1-thread
    latency ratio."""
    peers = _peers_ok(rows)
    return min(peers, key=lambda r: (-r["agreement"], r["latency_ratio_1t"])) if peers else None


def _status(r: dict) -> str:
    if r["rc"]:
        return f"exit {r['rc']}: {r.get('error') or ''}".replace("|", "\\|")
    if r.get("eval_error"):
        return f"output does not run: {r['eval_error']}".replace("|", "\\|")
    notes = [] if r.get("q_nodes") or r.get("int8_weights") else ["nothing quantized"]
    info = r.get("info") or {}
    if info.get("pre_process_error"):
        notes.append("quant_pre_process failed; quantized the original")
    if info.get("export", "to_onnx_qdq") != "to_onnx_qdq":
        notes.append(f"exported with {info['export']}")
    return "; ".join(notes)


def _loads(data: dict) -> list[float]:
    return [x for r in data["rows"] for x in r.get("load_1m", [])]


def render(data: dict) -> str:
    m, v = data["machine"], data["versions"]
    loads = _loads(data)
    peak = max(loads) if loads else None
    ver = {line.split("==")[0]: line.split("==")[1] for line in [*v["peers"], *v["aimet"]] if "==" in line}
    ours = {line.split("==")[0]: line.split("==")[1] for line in v["ours"] if "==" in line}
    lines = [
        HEADING,
        "",
        "Generated by `bench/real_models/run_real_peers.py` (do not edit by hand).",
        "",
        f"Machine: {m['nproc']} CPUs ({m['cpu']}; flags: {m['flags']}), {m['ram']}; {m['date']}; git {v['git']}. "
        f"Versions: ours onnxslim {ours.get('onnxslim')} with onnxruntime {ours.get('onnxruntime')} (every "
        f"evaluation runs here); ONNX Runtime quantization tools {ver.get('onnxruntime')}; nncf {ver.get('nncf')}; "
        f"aimet-onnx {ver.get('aimet-onnx')} (torch {ver.get('torch')})."
        + (
            f" The last full run ({len({r['model'] for r in data['rows']})} models x {len(TOOLS)} tools) took "
            f"{data['full_run_s'] / 60:.0f} min."
            if data.get("full_run_s")
            else ""
        ),
        "",
        "Each tool quantized each model once, one at a time, in its own subprocess, with all of the model's "
        "calibration feeds; agreement is with the fp32 model's own decisions on the held-out feeds (`eval_more` where "
        "the model has it, else `eval`; `bench/real_models/decisions.py`); latency ratio = int8 / fp32 median "
        "(onnxruntime default optimizations, interleaved runs over the first 8 feeds). Recipes:",
        "",
        *[f"- `{t}`: {RECIPES[t]}" for t in data["tools"]],
        "",
    ]
    if peak is not None:
        lines += [
            f"1-minute load average during the latency measurements: {min(loads):.2f} to {peak:.2f} "
            f"(median {sorted(loads)[len(loads) // 2]:.2f}) on {m['nproc']} CPUs"
            + (
                "; the latency ratios were measured under contention from other processes and are noisier than on "
                "an idle machine."
                if peak > 1.5
                else "."
            ),
            "",
        ]
    lines += [
        "| model | tool | agreement | output cosine | size ratio | latency 1t | latency 2t | quant time | peak RSS "
        "| note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    models = list(dict.fromkeys(r["model"] for r in data["rows"]))
    for name in models:
        for r in [r for r in data["rows"] if r["model"] == name]:
            rss = f"{r['quant_peak_rss_mb']:.0f} MB" if r.get("quant_peak_rss_mb") else "-"
            if _ok(r):
                cells = [
                    f"{r['agreement']:.4f}",
                    f"{r['cosine']:.6f}",
                    f"{r['size_ratio']:.3f}",
                    f"{r['latency_ratio_1t']:.3f}",
                    f"{r['latency_ratio_2t']:.3f}",
                ]
            else:
                cells = [""] * 5
            lines.append(
                f"| {name} | {r['tool']} | {' | '.join(cells)} | {r['quant_s']:.1f} s | {rss} | {_status(r)} |"
            )
    lines += [
        "",
        "Best peer per model (highest agreement among the outputs that quantized something, i.e. have Q/DQ "
        "nodes or int8 weights; a tie goes to the lower 1-thread latency ratio):",
        "",
    ]
    lines += [
        "| model | task (package) | feeds | ours | best peer | its agreement | ours minus best peer |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in models:
        rs = [r for r in data["rows"] if r["model"] == name]
        o = next((r for r in rs if r["tool"] == "ours" and _ok(r)), None)
        b = best_peer(rs)
        cells = [name, f"{rs[0]['task']} ({rs[0]['package']})", str(rs[0]["n_eval"])]
        cells.append(f"{o['agreement']:.4f}" if o else ("failed" if any(r["tool"] == "ours" for r in rs) else "-"))
        if b:
            ties = [r["tool"] for r in rs if r in _peers_ok(rs) and r["agreement"] == b["agreement"]]
            tied = f" (tied: {', '.join(t for t in ties if t != b['tool'])})" if len(ties) > 1 else ""
            cells += [b["tool"] + tied, f"{b['agreement']:.4f}", f"{o['agreement'] - b['agreement']:+.4f}" if o else ""]
        else:
            cells += ["no peer ran", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", help="comma list of model names (default: all)")
    ap.add_argument("--tools", default=",".join(TOOLS), help=f"comma list from {','.join(TOOLS)}")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds for one peer quantization")
    ap.add_argument("--report-only", action="store_true", help="re-render from results_int8_peers.json")
    args = ap.parse_args()
    if args.report_only:
        data = json.loads(JSON_OUT.read_text())
    else:
        tools = [t for t in args.tools.split(",") if t]
        bad = [t for t in tools if t not in TOOLS]
        if bad:
            ap.error(f"unknown tools {bad}; choose from {TOOLS}")
        data = run(args.models.split(",") if args.models else None, tools, args.timeout)
        full = not args.models and tools == list(TOOLS)
        data["full_run_s"] = data["run_s"] if full else None
        if JSON_OUT.exists() and not full:  # a partial run replaces its own rows and keeps the others
            old = json.loads(JSON_OUT.read_text())
            fresh = {(r["model"], r["tool"]) for r in data["rows"]}
            data["rows"] = [r for r in old["rows"] if (r["model"], r["tool"]) not in fresh] + data["rows"]
            names = [e["name"] for e in json.loads((OUT / "manifest.json").read_text())["models"]]
            data["rows"].sort(key=lambda r: (names.index(r["model"]), TOOLS.index(r["tool"])))
            data["tools"] = [t for t in TOOLS if t in {r["tool"] for r in data["rows"]}]
            data["full_run_s"] = old.get("full_run_s")
        JSON_OUT.write_text(json.dumps(data, indent=1))
    int8_report.write_section(ROOT / "bench" / "RESULTS.md", render(data), heading=HEADING)
    print(f"wrote {JSON_OUT} and the {HEADING!r} section of bench/RESULTS.md")


if __name__ == "__main__":
    main()
