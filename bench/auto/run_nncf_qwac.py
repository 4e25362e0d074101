"""The peer of ``--auto`` for int8 under a budget: NNCF's ``quantize_with_accuracy_control`` on the real-model set.

Runs in ``bench/.venv-quant-peers`` (``bash bench/setup_quant_peers.sh``; never in the project's venv). For each
model of ``bench/out/real_models/manifest.json``: calibration = the model's ``calib`` feeds, validation = its
``eval`` feeds, ``validation_fn`` = the same task agreement with the original's decisions that ``--auto`` is
judged by (``bench/real_models/decisions.py``), ``max_drop=0.01`` absolute. Records file size ratio, latency
ratio at 1 thread (onnxruntime CPU, all graph optimizations, median of interleaved runs), agreement on EVAL
(recomputed here, not NNCF's number), wall time and peak RSS of the quantization, each model in its own process.
Writes ``bench/out/auto/nncf_qwac.json``; ``run_auto.py --report-only`` puts it beside ``--auto`` in RESULTS.md.

    bench/.venv-quant-peers/bin/python bench/auto/run_nncf_qwac.py [--models a,b]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
REAL = ROOT / "bench" / "out" / "real_models"
OUT = ROOT / "bench" / "out" / "auto"
sys.path.insert(0, str(ROOT / "bench" / "real_models"))
from decisions import eval_split  # noqa: E402, F401  (re-exported for the other auto scripts)


def _feeds(folder: Path) -> list[dict]:
    out = []
    for f in sorted(folder.glob("*.npz")):
        with np.load(f) as z:
            out.append({k: z[k] for k in z.files if not k.startswith("__")})
    return out


def judged(entry: dict, src: Path, dst: Path, ev: list[dict], value: float, seconds: float) -> dict:
    """The row every peer reports: size and 1-thread latency ratios to fp32, agreement and the 1-point verdict,
    wall time, peak RSS of this process."""
    return {
        "model": entry["name"],
        "size_ratio": dst.stat().st_size / src.stat().st_size,
        "latency_ratio": _latency(src.read_bytes(), dst.read_bytes(), ev[0]),
        "agreement": value,
        "meets_budget": 1.0 - value <= 0.01 + 1e-12,
        "seconds": seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _run_all(sess, feeds):
    return [sess.run(None, f) for f in feeds]


def _session(model_bytes: bytes, threads: int = 1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def _latency(a: bytes, b: bytes, feed: dict, rounds: int = 30) -> float:
    sa, sb = _session(a), _session(b)
    for s in (sa, sb):
        s.run(None, feed)
    ta, tb = [], []
    for _ in range(rounds):  # interleaved: both see the same machine state
        t = time.perf_counter()
        sa.run(None, feed)
        ta.append(time.perf_counter() - t)
        t = time.perf_counter()
        sb.run(None, feed)
        tb.append(time.perf_counter() - t)
    return float(np.median(tb) / np.median(ta))


def one(entry: dict) -> dict:
    import nncf
    import onnx
    from decisions import agreement

    d = REAL / entry["name"]
    src = d / "model.onnx"
    model = onnx.load(src)
    calib = _feeds(d / "calib")
    ev = _feeds(eval_split(d))
    original = _session(model.SerializeToString())

    def validate(candidate: onnx.ModelProto, data) -> float:
        # NNCF also calls this on subsets of the validation data (to rank layers): the reference is the original
        # model's outputs on the very feeds it is given
        data = list(data)
        got = _run_all(_session(candidate.SerializeToString()), data)
        return float(agreement(entry, _run_all(original, data), got))

    t0 = time.perf_counter()
    q = nncf.quantize_with_accuracy_control(
        model,
        nncf.Dataset(calib),
        nncf.Dataset(ev),
        validation_fn=validate,
        max_drop=0.01,
        drop_type=nncf.DropType.ABSOLUTE,
        subset_size=len(calib),
    )
    seconds = time.perf_counter() - t0
    dst = OUT / f"{entry['name']}.nncf_qwac.onnx"
    onnx.save(q, dst)
    return {
        **judged(entry, src, dst, ev, validate(q, ev), seconds),
        "nncf": nncf.__version__,
        "qdq_nodes": sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in q.graph.node),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    entries = json.loads((REAL / "manifest.json").read_text())["models"]
    if args.one:
        print(json.dumps(one(next(e for e in entries if e["name"] == args.one))))
        return
    wanted = set(args.models.split(",")) if args.models else None
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "nncf_qwac.json"
    rows = {r["model"]: r for r in (json.loads(path.read_text()) if path.exists() else [])}
    for e in entries:
        if wanted and e["name"] not in wanted:
            continue
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, __file__, "--one", e["name"]], capture_output=True, text=True)
        if p.returncode == 0:
            row = json.loads(p.stdout.strip().splitlines()[-1])
        else:
            row = {"model": e["name"], "error": (p.stderr.strip().splitlines() or [""])[-1][:300]}
        row["wall_s"] = round(time.perf_counter() - t0)
        print(json.dumps(row), flush=True)
        rows[e["name"]] = row
        path.write_text(json.dumps(list(rows.values()), indent=1))


if __name__ == "__main__":
    main()
