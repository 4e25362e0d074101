"""The fuzzer's long run, by hand: N mutants of the sample models through `info`, `optimize --check-data`
and `check` (tests/_fuzz.py has the mutators and the per-command oracle).

    .venv/bin/python bench/fuzz/run_fuzz.py --mutants 1000 [--start-seed 0] [--timeout 60]

Writes bench/out/fuzz/results.json (every mutant with a problem, exit-code counts per command, timings) and the
"Fuzzing" section of bench/RESULTS.md, and prints a summary; exits 1 if any mutant had a problem (an exit
other than 0/1/2, a traceback, a hang, output written on exit 2, the input modified).
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
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "bench")]

import _fuzz  # noqa: E402
import int8_report  # noqa: E402

HEADING = "## Fuzzing the CLI with mutated sample models"


def _preload() -> None:
    """Import every module of the package before forking, so the children run one fixed version of the code."""
    import importlib
    import pkgutil

    import onnxslim
    import onnxslim.passes

    for pkg in (onnxslim, onnxslim.passes):  # the passes live in their own folder (package-dir mapping)
        for mod in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            importlib.import_module(mod.name)


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _render(r: dict, args) -> str:
    import os

    lines = [
        HEADING,
        "",
        f"`bench/fuzz/run_fuzz.py --mutants {r['mutants']} --start-seed {r['start_seed']} --timeout {args.timeout:g}`, "
        f"{r['date']}, {r['machine']}, {os.cpu_count()} cores: {r['commands']} commands on {r['mutants']} "
        f"mutants of the sample models in {r['wall_s']:.0f} s. Problems (exit outside 0/1/2, traceback, hang, "
        f"output written on exit 2, input modified): **{len(r['problems'])}**.",
        "",
        "| command | exit 0 | exit 1 | exit 2 | other |",
        "|---|---:|---:|---:|---:|",
    ]
    for cmd in ("info", "optimize", "check"):
        counts = {k.split(" exit ")[1]: v for k, v in r["exit_codes"].items() if k.startswith(cmd + " ")}
        other = sum(v for k, v in counts.items() if k not in ("0", "1", "2"))
        lines.append(f"| {cmd} | {counts.get('0', 0)} | {counts.get('1', 0)} | {counts.get('2', 0)} | {other} |")
    lines += ["", "Mutations applied: " + ", ".join(f"{k} {v}" for k, v in r["mutations"].items()) + "."]
    for p in r["problems"]:
        lines.append(
            f"- {p['model']} seed {p['seed']} ({', '.join(p['mutations'])}): {p['command']}: {'; '.join(p['problems'])}"
        )
    return "\n".join(lines) + "\n"


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
        "machine": f"{_cpu_name()} ({platform.machine()}), Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "problems"}, indent=1))
    int8_report.write_section(ROOT / "bench" / "RESULTS.md", _render(result, args), heading=HEADING)
    print(f"{len(problems)} mutant command(s) with problems; details in {out}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
