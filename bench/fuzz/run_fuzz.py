"""The fuzzer's long run, by hand: N mutants of the sample models through `info`, `optimize --check-data`
and `check` (tests/_fuzz.py has the mutators and the per-command oracle).

    .venv/bin/python bench/fuzz/run_fuzz.py --mutants 1000 [--start-seed 0] [--timeout 60]

Writes bench/out/fuzz/results.json (every mutant with a problem, exit-code counts per command, timings) and
prints a summary; exits 1 if any mutant had a problem (an exit other than 0/1/2, a traceback, a hang, output
written on exit 2, the input modified).
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

import _fuzz  # noqa: E402


def _preload() -> None:
    """Import every module of the package before forking, so the children run one fixed version of the code."""
    import importlib
    import pkgutil

    import onnxslim
    import onnxslim.passes

    for pkg in (onnxslim, onnxslim.passes):  # the passes live in their own folder (package-dir mapping)
        for mod in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            importlib.import_module(mod.name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mutants", type=int, default=500)
    ap.add_argument("--start-seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per command before it counts as a hang")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "fuzz" / "results.json"))
    args = ap.parse_args()
    _preload()
    names = _fuzz.sample_model_names()
    rcs: collections.Counter = collections.Counter()
    mutators: collections.Counter = collections.Counter()
    problems, slowest = [], []
    t0 = time.monotonic()
    for i in range(args.mutants):
        seed = args.start_seed + i
        name = names[seed % len(names)]
        applied, results = _fuzz.run_mutant(name, seed, timeout=args.timeout)
        mutators.update(applied)
        for r in results:
            rcs[f"{r.argv[0]} exit {r.rc if r.rc is not None else 'killed'}"] += 1
            slowest.append((r.seconds, name, seed, r.argv[0]))
            if r.problems:
                problems.append(
                    {
                        "model": name,
                        "seed": seed,
                        "mutations": applied,
                        "command": r.argv[0],
                        "problems": r.problems,
                        "stderr": r.stderr_tail[-1500:],
                    }
                )
        if (i + 1) % 50 == 0:
            print(
                f"{i + 1}/{args.mutants} mutants, {len(problems)} problem(s), {time.monotonic() - t0:.0f}s", flush=True
            )
    wall = time.monotonic() - t0
    slowest.sort(reverse=True)
    result = {
        "mutants": args.mutants,
        "start_seed": args.start_seed,
        "commands": sum(rcs.values()),
        "exit_codes": dict(sorted(rcs.items())),
        "mutations": dict(sorted(mutators.items())),
        "problems": problems,
        "wall_s": round(wall, 1),
        "slowest": [{"seconds": round(s, 2), "model": m, "seed": sd, "command": c} for s, m, sd, c in slowest[:5]],
        "machine": f"{platform.machine()} {platform.processor() or ''} {platform.python_version()}".strip(),
        "date": time.strftime("%Y-%m-%d"),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "problems"}, indent=1))
    print(f"{len(problems)} mutant command(s) with problems; details in {out}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
