"""Quantize every model from ``make_models.py`` with the CLI and check it: exit code, loads and runs in onnxruntime
with and without graph optimizations, output SNR against fp32, latency ratio @1 thread, and for the detector
the error of the box pixels and of the scores separately.

Calibration (16 feeds) and evaluation (8 feeds) are seeded random inputs of each model's input shape (batch 1-2;
token ids for the GRU model, with sequence lengths 8-20). Writes the ``## int8 on exported architectures`` section
of bench/RESULTS.md and ``bench/out/arch_sweep/results.json``.

    python bench/arch_sweep/make_models.py bench/out/arch_sweep/models     # torch venv, once
    .venv/bin/python bench/arch_sweep/run_sweep.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import int8_report  # noqa: E402

OUT = ROOT / "bench" / "out" / "arch_sweep"
CLI = ROOT / ".venv" / "bin" / "onnxslim"
HEADING = "## int8 on exported architectures"


def _feeds(model: onnx.ModelProto, n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    inp = model.graph.input[0]
    out = []
    for i in range(n):
        elem = inp.type.tensor_type.elem_type
        if elem in (onnx.TensorProto.INT64, onnx.TensorProto.INT32):  # token ids (tables of >= 300 rows)
            dtype = np.int64 if elem == onnx.TensorProto.INT64 else np.int32
            out.append({inp.name: rng.integers(0, 300, (1 + i % 2, 8 + (i % 5) * 3)).astype(dtype)})
        else:
            dims = [d.dim_value or 1 for d in inp.type.tensor_type.shape.dim]
            dims[0] = 1 + i % 2
            out.append({inp.name: rng.standard_normal(dims).astype(np.float32)})
    return out


def _session(path: Path, optimize: bool = True) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _check(name: str, src: Path, dst: Path, feeds: list[dict]) -> dict:
    ref, opt, raw = _session(src, False), _session(dst, True), _session(dst, False)
    num = den = den_raw = 0.0
    box = score = 0.0
    for f in feeds:
        r = ref.run(None, f)[0].astype(np.float64)
        y = opt.run(None, f)[0].astype(np.float64)
        num += float((r**2).sum())
        den += float(((y - r) ** 2).sum())
        den_raw += float(((raw.run(None, f)[0] - r) ** 2).sum())
        if name.startswith("detectorish"):  # [B, anchors, 4 box pixels + 5 scores]
            box = max(box, float(np.abs(y[..., :4] - r[..., :4]).max()))
            score = max(score, float(np.abs(y[..., 4:] - r[..., 4:]).max()))
    row = {"snr_db": round(10 * np.log10(num / den), 1), "snr_db_unoptimized": round(10 * np.log10(num / den_raw), 1)}
    if name.startswith("detectorish"):
        row.update(box_max_abs_px=round(box, 3), score_max_abs=round(score, 4))
    f32 = _session(src, True)
    times: dict[str, list[float]] = {"f": [], "q": []}
    for k in range(23):  # 3 warm-ups; fp32 and int8 alternate
        for tag, s in (("f", f32), ("q", opt)) if k % 2 == 0 else (("q", opt), ("f", f32)):
            t0 = time.perf_counter()
            for f in feeds:
                s.run(None, f)
            if k >= 3:
                times[tag].append(time.perf_counter() - t0)
    row["latency_ratio_1t"] = round(float(np.median(times["q"]) / np.median(times["f"])), 3)
    return row


def run() -> dict:
    rows = []
    for src in sorted((OUT / "models").glob("*.onnx")):
        name = src.stem
        model = onnx.load(str(src))
        calib = OUT / "calib" / name
        calib.mkdir(parents=True, exist_ok=True)
        for i, f in enumerate(_feeds(model, 16, 1)):
            np.savez(calib / f"{i:04d}.npz", **f)
        dst = OUT / "int8" / f"{name}.onnx"
        dst.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        p = subprocess.run(
            [str(CLI), "optimize", str(src), "-o", str(dst), "--quantize", "int8", "--calib", str(calib)],
            capture_output=True,
            text=True,
        )
        row = {
            "model": name,
            "opset": model.opset_import[0].version,
            "rc": p.returncode,
            "quant_s": round(time.perf_counter() - t0, 2),
            "bytes_fp32": src.stat().st_size,
        }
        if p.returncode != 0:
            row["error"] = (p.stderr or p.stdout).strip().splitlines()[-1][:300]
        else:
            row["bytes_int8"] = dst.stat().st_size
            try:
                row.update(_check(name, src, dst, _feeds(model, 8, 2)))
            except Exception as e:  # noqa: BLE001 - recorded as a failure of this model
                row["error"] = f"does not run: {str(e).splitlines()[0][:300]}"
        print(row, flush=True)
        rows.append(row)
    return {"machine": int8_report.machine(), "onnxruntime": ort.__version__, "rows": rows}


def render(data: dict) -> str:
    m = data["machine"]
    lines = [
        HEADING,
        "",
        "Generated by `bench/arch_sweep/run_sweep.py` (do not edit by hand).",
        "",
        f"Machine: {m['nproc']} CPUs, {m['cpu']}; onnxruntime {data['onnxruntime']}; {m['date']}. Models: "
        "`bench/arch_sweep/make_models.py` (torch.onnx exports of common architecture shapes with random "
        "weights: robustness, not accuracy) and `make_keras_models.py` (Keras models through tf2onnx). "
        "Each is quantized with `onnxslim optimize M -o OUT --quantize "
        "int8 --calib C` (16 seeded feeds) and run on 8 other seeded feeds. SNR = 10 log10(sum y^2 / "
        "sum (y_int8 - y)^2) of the output against fp32, with onnxruntime's optimizations (and without); "
        "latency = int8 / fp32 @1 thread, median of 20 alternating passes.",
        "",
        "| model | opset | exit | size fp32 -> int8 | SNR dB (opt / no opt) | latency @1t | notes |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in data["rows"]:
        size = f"{r['bytes_fp32'] / 1024:.1f} -> {r['bytes_int8'] / 1024:.1f} kB" if "bytes_int8" in r else "-"
        snr = f"{r['snr_db']} / {r['snr_db_unoptimized']}" if "snr_db" in r else "-"
        notes = r.get("error", "")
        if "box_max_abs_px" in r:
            notes = f"box pixels max abs error {r['box_max_abs_px']} (of 0..320), scores {r['score_max_abs']} (of 0..1)"
        lines.append(
            f"| {r['model']} | {r['opset']} | {r['rc']} | {size} | {snr} | {r.get('latency_ratio_1t', '-')} | {notes} |"
        )
    if data.get("summary"):
        lines += ["", data["summary"].strip()]
    return "\n".join(lines) + "\n"


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--summary-file", help="hand-written markdown put under the table (kept in the JSON)")
    ap.add_argument("--report-only", action="store_true", help="re-render from bench/out/arch_sweep/results.json")
    a = ap.parse_args()
    if a.report_only:
        data = json.loads((OUT / "results.json").read_text())
    elif not (OUT / "models").exists():
        raise SystemExit(f"no models in {OUT / 'models'}; make them with bench/arch_sweep/make_models.py")
    else:
        data = run()
    if a.summary_file:
        data["summary"] = Path(a.summary_file).read_text()
    (OUT / "results.json").write_text(json.dumps(data, indent=1))
    int8_report.write_section(ROOT / "bench" / "RESULTS.md", render(data), HEADING)
    print(f"wrote {ROOT / 'bench' / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
