"""Markdown for the ``## Static int8 quantization`` section of bench/RESULTS.md (rows from ``run_int8.py``).

Only that section is replaced (or appended); the lossless section above it is left as it is.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import platform
from pathlib import Path

HEADING = "## Static int8 quantization"
PEERS = ("ort-minmax", "ort-percentile", "nncf")


def machine() -> dict:
    cpu, mem = "unknown", "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal"):
            mem = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    return {
        "nproc": os.cpu_count(),
        "ram": mem,
        "cpu": cpu,
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _kb(n) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.1f} MB" if n >= 1e7 else f"{n / 1000:.1f} kB"


def _f(v, fmt="{:.3f}") -> str:
    return "-" if v is None else fmt.format(v)


def _quantized(r: dict) -> bool:
    return bool(r.get("q_nodes", 0) or r.get("int8_weights", 0))


def _status(r: dict) -> str:
    if r["tool"] == "fp32":
        return "reference" if r["ok"] else f"FAILED: {r['error']}"
    if r.get("error") and "nothing to quantize" in r["error"]:
        return (
            f"REFUSED (exit {r.get('rc')}, no output): nothing to quantize; the error names the ml ops and "
            "suggests `allow_nothing=true`"
        )
    if r.get("error"):
        return f"FAILED (exit {r.get('rc')}): {r['error']}".replace("|", "\\|")
    if r.get("eval_error"):
        return f"output does not run: {r['eval_error']}".replace("|", "\\|")
    notes = []
    if not _quantized(r):
        notes.append("nothing quantized (no Q/DQ nodes, no int8 weights)")
    pe = (r.get("info") or {}).get("pre_process_error")
    if pe:
        notes.append(f"quant_pre_process failed ({pe[:120]}); quantized the original")
    return "ok" + (": " + "; ".join(notes) if notes else "")


def _paired(ours: dict, peer: dict) -> str:
    """The samples only one of the two gets right, and the exact two-sided McNemar (sign test) p-value."""
    a, b = ours.get("correct"), peer.get("correct")
    if not a or not b or len(a) != len(b):
        return ""
    only_ours = sum(1 for x, y in zip(a, b) if x == "1" and y == "0")
    only_peer = sum(1 for x, y in zip(a, b) if x == "0" and y == "1")
    n, k = only_ours + only_peer, min(only_ours, only_peer)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0
    return f"; samples only ours gets right {only_ours}, only the peer {only_peer} (McNemar exact p = {p:.2g})"


def _targets(rows: list[dict]) -> list[str]:
    import json

    manifest = Path(__file__).resolve().parent.parent / "sample_models" / "manifest.json"
    n_eval = {m["name"]: m.get("n_eval") for m in json.loads(manifest.read_text())["models"]}
    out = []
    by_model: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_model.setdefault(r["model"], {})[r["tool"]] = r
    for model, tools in by_model.items():
        ours = tools.get("ours")
        if not ours:
            continue
        peers = [tools[p] for p in PEERS if p in tools and tools[p].get("ok") and _quantized(tools[p])]
        if ours.get("error") and "nothing to quantize" in ours["error"]:
            did = [p["tool"] for p in peers]
            out.append(
                f"- **{model}**: ours refused (exit {ours.get('rc')}: nothing to quantize, only ai.onnx.ml "
                f"ops); peers that quantized anything: {', '.join(did) if did else 'none'} "
                "(targets not applicable)"
            )
            continue
        if not ours.get("ok"):
            out.append(f"- **{model}**: ours FAILED ({ours.get('error') or ours.get('eval_error')})")
            continue
        if not _quantized(ours):
            note = "ours quantized nothing"
            if peers:
                note += f"; peers that did: {', '.join(p['tool'] for p in peers)}"
            out.append(f"- **{model}**: {note} (targets not applicable)")
            continue
        if not peers:
            out.append(f"- **{model}**: no peer produced a working quantized model; nothing to compare")
            continue
        parts = []
        bp = max(peers, key=lambda p: p["accuracy"])
        n = n_eval.get(model)
        diff = f" ({round((ours['accuracy'] - bp['accuracy']) * n):+d} of {n} samples)" if n else ""
        parts.append(
            f"accuracy {ours['accuracy']:.4f} vs best peer {bp['accuracy']:.4f} ({bp['tool']}) "
            f"{'PASS' if ours['accuracy'] >= bp['accuracy'] else 'FAIL'}{diff}{_paired(ours, bp)}"
        )
        if ours.get("agreement") is not None and all(p.get("agreement") is not None for p in peers):
            ba = max(peers, key=lambda p: p["agreement"])
            parts.append(
                f"agreement with fp32 {ours['agreement']:.4f} vs best peer {ba['agreement']:.4f} ({ba['tool']})"
            )
        for t in ("1t", "2t"):
            bp = min(peers, key=lambda p: p[f"ratio_{t}"])
            a, b = ours.get(f"ratios_{t}") or [], bp.get(f"ratios_{t}") or []
            overlap = bool(a and b and min(a) <= max(b) and min(b) <= max(a))
            parts.append(
                f"latency@{t} {ours[f'ratio_{t}']:.3f} vs best peer {bp[f'ratio_{t}']:.3f} ({bp['tool']}) "
                f"{'PASS' if ours[f'ratio_{t}'] <= bp[f'ratio_{t}'] else 'FAIL'}"
                f"{' (per-repeat ranges overlap: not significant)' if overlap else ''}"
            )
        orts = [
            tools[p]["peak_rss_mb"]
            for p in ("ort-minmax", "ort-percentile")
            if p in tools and tools[p].get("peak_rss_mb") and not tools[p].get("error")
        ]
        if orts:
            parts.append(
                f"peak RSS {ours['peak_rss_mb']:.1f} MB vs ORT min {min(orts):.1f} MB "
                f"{'PASS' if ours['peak_rss_mb'] <= min(orts) else 'FAIL'}"
            )
        out.append(f"- **{model}**: " + "; ".join(parts))
    return out


def render(data: dict) -> str:
    m, v = data["machine"], data["versions"]
    lines = [
        HEADING,
        "",
        "Generated by `bench/run_int8.py` (do not edit by hand; re-run it, or `--report-only` to re-render "
        "from `bench/out/int8_results.json`).",
        "",
        f"Machine: {m['nproc']} CPUs, {m['ram']} RAM, {m['cpu']}; Python {m['python']}; {m['date']}. "
        "The machine is shared and noisy.",
        "",
        "Versions:",
        "",
        *[f"- ours venv: `{x}`" for x in v.get("ours", [])],
        f"- ours git: `{v.get('git')}`",
        *[f"- peers venv (`bench/.venv-quant-peers`): `{x}`" for x in v.get("peers", [])],
        "",
        "Tools: **ours** = `onnxslim optimize M -o OUT --quantize int8 --calib sample_models/<m>/calib` "
        "(default lossless pipeline + `quantize_int8_static`, default options); **ort-minmax** / "
        "**ort-percentile** = `quant_pre_process` then `quantize_static(QDQ, per_channel=True, "
        "activation_type=QUInt8, weight_type=QInt8, calibrate_method=MinMax|Percentile)`; **nncf** = "
        "`nncf.quantize(model, nncf.Dataset(feeds), subset_size=32)` (ONNX backend, defaults). All get the "
        "same 32 calibration feeds.",
        "",
        "Columns: size = output .onnx (+ external data); Q/DQ = QuantizeLinear/DequantizeLinear/QLinear*/"
        "*Integer nodes in the output; int8 W = weights stored as 8-bit integers (rank >= 2), however decoded "
        "(DequantizeLinear, or Cast + Mul for weights-only layers); both 0 = nothing was quantized; "
        "accuracy = top-1 against `__label__` on "
        "the held-out `eval/` batches; lat ratio = int8 time / fp32 time for one pass over all eval batches, "
        "ORT CPU with its default graph optimizations, `intra_op_num_threads` 1 or 2, fp32 and int8 "
        f"alternated in one process, median of {data['latency_runs']} passes after 3 warm-ups; that "
        f"measurement is repeated in {data.get('repeat', 1)} separate processes and the median ratio is shown "
        "(the machine is a shared 2-core VM: ratio differences under ~10 %, especially @2t, are within the "
        "spread we saw between repeats; the per-repeat ratios are in the JSON); quant s (median) and peak "
        "RSS (max) are over the same number of runs of the whole quantizer subprocess (`/usr/bin/time -v`, "
        "including Python start-up and imports; for ours also the lossless pipeline and the checker, for ORT "
        "also `quant_pre_process`).",
        "",
        "Fidelity to fp32 (no labels involved): agree = fraction of eval samples whose prediction equals "
        "the fp32 model's; SNR = 10 log10(sum y^2 / sum (y_int8 - y)^2) over the label output's values "
        "(higher is closer; '-' = identical outputs or not measured).",
        "",
        "| model | tool | size | Q/DQ | int8 W | accuracy | agree | SNR dB | lat ratio @1t | lat ratio @2t | "
        "quant s | peak RSS MB | status |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in data["rows"]:
        if r["tool"] == "fp32":
            lines.append(
                f"| {r['model']} | fp32 | {_kb(r.get('bytes'))} | {r.get('q_nodes', '-')} | "
                f"{r.get('int8_weights', '-')} | "
                f"{_f(r.get('accuracy'), '{:.4f}')} | 1 | - | 1 | 1 | - | - | {_status(r)} |"
            )
            continue
        lines.append(
            f"| {r['model']} | {r['tool']} | {_kb(r.get('bytes'))} | {r.get('q_nodes', '-')} | "
            f"{r.get('int8_weights', '-')} | "
            f"{_f(r.get('accuracy'), '{:.4f}')} | {_f(r.get('agreement'), '{:.4f}')} | "
            f"{_f(r.get('snr_db'), '{:.1f}')} | {_f(r.get('ratio_1t'))} | {_f(r.get('ratio_2t'))} | "
            f"{_f(r.get('wall_s'), '{:.2f}')} | {_f(r.get('peak_rss_mb'), '{:.1f}')} | {_status(r)} |"
        )
    lines += [
        "",
        "### Targets (ours vs peers that produced a working quantized model)",
        "",
        "Targets: our accuracy >= the best peer's; our latency ratio <= the best peer's at 1 and 2 "
        "threads; our peak RSS <= ORT's (the lower of its two runs). Reported as measured.",
        "",
        *_targets(data["rows"]),
        "",
    ]
    summary = data.get("summary")
    if summary:
        lines += ["### Summary", "", summary.strip(), ""]
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str, heading: str = HEADING) -> None:
    """Replace the section under ``heading`` in RESULTS.md (up to the next '## ' heading or the end) or append
    it."""
    HEADING = heading  # noqa: N806 - the section this call replaces
    text = path.read_text() if path.exists() else ""
    start = text.find("\n" + HEADING + "\n")
    if start < 0 and text.startswith(HEADING + "\n"):
        start = -1
        before, after = "", text[len(HEADING) + 1 :]
    elif start < 0:
        path.write_text(text.rstrip("\n") + "\n\n" + section)
        return
    else:
        before, after = text[: start + 1], text[start + 1 + len(HEADING) + 1 :]
    nxt = after.find("\n## ")
    rest = after[nxt + 1 :] if nxt >= 0 else ""
    path.write_text(before + section + ("\n" + rest if rest else ""))
