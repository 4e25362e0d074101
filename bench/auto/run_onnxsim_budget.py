"""The other peer of ``--auto``: onnxsim 0.8.1's accuracy-budget pipeline (``onnxsim.apply_optimization_pipeline``).

Runs in ``bench/.venv-peers`` (``bash bench/setup_peers.sh``; never in the project's venv). onnxsim's budget is
the worst relative L2 error of the outputs on the calibration data, not a task metric, so it is swept
(``--budgets``, default 0.01, 0.05 and its default 0.1), each run given the model's ``calib`` feeds, and every
result is judged here on the same held-out feeds and by the same task agreement (``bench/real_models/
decisions.py``) as ``--auto``: file size ratio, latency ratio at 1 thread, agreement, the stages it applied,
wall time and peak RSS (each run in its own process, ``--timeout`` seconds at most).
Writes ``bench/out/auto/onnxsim_budget.json``; ``run_auto.py --report-only`` puts it beside ``--auto``.

    bench/.venv-peers/bin/python bench/auto/run_onnxsim_budget.py [--models a,b] [--budgets 0.01,0.1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "bench" / "auto"), str(ROOT / "bench" / "real_models")]
from run_nncf_qwac import OUT, REAL, _feeds, _run_all, _session, eval_split, judged  # noqa: E402


def one(entry: dict, budget: float) -> dict:
    import onnx
    import onnxsim
    from decisions import agreement

    d = REAL / entry["name"]
    src = d / "model.onnx"
    calib = _feeds(d / "calib")
    ev = _feeds(eval_split(d))
    ref = _run_all(_session(src.read_bytes()), ev)
    t0 = time.perf_counter()
    res = onnxsim.apply_optimization_pipeline(str(src), accuracy_budget=budget, calibration_data=calib)
    seconds = time.perf_counter() - t0
    dst = OUT / f"{entry['name']}.onnxsim_budget_{budget}.onnx"
    onnx.save(res.optimized_model, dst)
    got = _run_all(_session(dst.read_bytes()), ev)
    return {
        **judged(entry, src, dst, ev, float(agreement(entry, ref, got)), seconds),
        "onnxsim_budget": budget,
        "stages": list(res.stages_applied),
        "onnxsim_meets_own_budget": bool(res.meets_budget),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models")
    ap.add_argument("--budgets", default="0.01,0.05,0.1")
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--budget", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    entries = json.loads((REAL / "manifest.json").read_text())["models"]
    if args.one:
        print(json.dumps(one(next(e for e in entries if e["name"] == args.one), args.budget)))
        return
    wanted = set(args.models.split(",")) if args.models else None
    path = OUT / "onnxsim_budget.json"
    rows = {(r["model"], r["onnxsim_budget"]): r for r in (json.loads(path.read_text()) if path.exists() else [])}
    for e in entries:
        if wanted and e["name"] not in wanted:
            continue
        for b in (float(x) for x in args.budgets.split(",")):
            t0 = time.perf_counter()
            cmd = [sys.executable, __file__, "--one", e["name"], "--budget", str(b)]
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                if p.returncode == 0:
                    row = json.loads(p.stdout.strip().splitlines()[-1])
                else:
                    row = {"error": (p.stderr.strip().splitlines() or [""])[-1][:300]}
            except subprocess.TimeoutExpired:
                row = {"error": f"over {args.timeout} s"}
            row.update(model=e["name"], onnxsim_budget=b, wall_s=round(time.perf_counter() - t0))
            print(json.dumps(row), flush=True)
            rows[(e["name"], b)] = row
            OUT.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(list(rows.values()), indent=1))


if __name__ == "__main__":
    main()
