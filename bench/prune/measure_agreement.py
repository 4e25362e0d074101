"""One candidate against its original: task agreement on the held-out split, file ratio, optional latency ratio.

    .venv/bin/python bench/prune/measure_agreement.py MODEL_NAME CANDIDATE.onnx [--latency]

MODEL_NAME is a folder of bench/out/real_models (setup.sh); agreement is with the original's own decisions
(decisions.agreement) on eval_more when the model has it, else eval. --latency adds candidate / original
(run_real._latency_ratio, 1 and 2 threads, three ratios each, plus the original against itself: the noise floor).
File sizes count the external data the model names (run_prune._files). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "real_models")]
from decisions import agreement, eval_split  # noqa: E402
from run_prune import REAL as OUT  # noqa: E402
from run_prune import _files  # noqa: E402
from run_real import _feeds, _latency_ratio, _session  # noqa: E402


def _size(p: Path) -> int:
    return sum(f.stat().st_size for f in _files(p))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("candidate", type=Path)
    ap.add_argument("--latency", action="store_true")
    args = ap.parse_args()
    models = json.loads((OUT / "manifest.json").read_text())["models"]
    entry = next((m for m in models if m["name"] == args.model), None)
    if entry is None:
        sys.exit(f"measure_agreement: no model {args.model!r} in {OUT / 'manifest.json'} (run setup.sh)")
    d = OUT / args.model
    orig = d / "model.onnx"
    feeds = _feeds(eval_split(d))
    ref_s, cand_s = _session(orig, 2), _session(args.candidate, 2)
    ref = [ref_s.run(None, f) for f in feeds]
    cand = [cand_s.run(None, f) for f in feeds]
    row = {
        "model": args.model,
        "agreement": round(agreement(entry, ref, cand), 4),
        "feeds": len(feeds),
        "file": round(_size(args.candidate) / _size(orig), 4),
    }
    if args.latency:
        for t in (1, 2):
            row[f"a_a_{t}t"] = round(_latency_ratio(orig, orig, feeds, t), 3)
            row[f"latency_{t}t"] = [round(_latency_ratio(orig, args.candidate, feeds, t), 3) for _ in range(3)]
    print(json.dumps(row))


if __name__ == "__main__":
    main()
