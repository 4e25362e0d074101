"""Fingerprint what the CLI writes for every sample model and every bench/arch_sweep model, so a refactoring
can prove it changed no output: run it before and after, then compare the two JSON files.

For each model: the default lossless pipeline (``optimize M -o OUT``) and ``--quantize int8 --calib CALIB``
(sample models: their own calibration data; arch_sweep models: the sweep's seeded calibration feeds), each
output hashed (sha256 of the .onnx file and of its .data file when there is one).

    .venv/bin/python bench/check_identical_outputs.py bench/out/identical/before.json
    ... change the code ...
    .venv/bin/python bench/check_identical_outputs.py bench/out/identical/after.json \
        --compare bench/out/identical/before.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
CLI = ROOT / ".venv" / "bin" / "onnxslim"
SWEEP = ROOT / "bench" / "out" / "arch_sweep"


def _digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def _models() -> list[tuple[str, Path, Path]]:
    """(name, model, calibration folder) for the sample models and the arch_sweep models that exist here."""
    out = []
    for m in json.loads((ROOT / "sample_models" / "manifest.json").read_text())["models"]:
        out.append((m["name"], ROOT / "sample_models" / m["path"], ROOT / "sample_models" / m["calib"]))
    sys.path.insert(0, str(ROOT / "bench" / "arch_sweep"))
    from run_sweep import _feeds  # the sweep's own seeded calibration feeds

    for src in sorted((SWEEP / "models").glob("*.onnx")):
        calib = SWEEP / "calib" / src.stem
        calib.mkdir(parents=True, exist_ok=True)
        for i, f in enumerate(_feeds(onnx.load(str(src)), 16, 1)):
            np.savez(calib / f"{i:04d}.npz", **f)
        out.append((f"arch_sweep/{src.stem}", src, calib))
    return out


def fingerprint() -> dict:
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, src, calib in _models():
            for job, extra in (("lossless", []), ("int8", ["--quantize", "int8", "--calib", str(calib)])):
                dst = Path(tmp) / f"{name.replace('/', '_')}.{job}.onnx"
                p = subprocess.run(
                    [str(CLI), "optimize", str(src), "-o", str(dst), "-q", *extra], capture_output=True, text=True
                )
                rows[f"{name}:{job}"] = {
                    "rc": p.returncode,
                    "onnx": _digest(dst),
                    "data": _digest(dst.with_name(dst.name + ".data")),
                }
                print(name, job, rows[f"{name}:{job}"], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("output", type=Path)
    ap.add_argument("--compare", type=Path, help="an earlier run's JSON: exit 1 when any output differs")
    args = ap.parse_args()
    rows = fingerprint()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(rows, indent=1, sort_keys=True))
    if args.compare:
        before = json.loads(args.compare.read_text())
        diff = sorted(k for k in set(before) | set(rows) if before.get(k) != rows.get(k))
        print(f"{len(rows)} outputs, {len(diff)} differ" + (": " + ", ".join(diff) if diff else ""))
        raise SystemExit(1 if diff else 0)


if __name__ == "__main__":
    main()
