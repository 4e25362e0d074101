"""The real-model set's task agreement as an ``--metric script.py:function`` for ``optimize --auto``.

``agreement(reference, candidate, samples)``: the model's own decision rule from ``bench/real_models/decisions.py``
(detection F1, text-mask IoU, top-1, CTC line agreement, VAD threshold), the manifest entry found by the
model's output names. 1.0 = the original's decisions."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench" / "real_models"))
from decisions import agreement as _agreement  # noqa: E402

ENTRY_BY_MODEL = {
    e["name"]: e for e in json.loads((ROOT / "bench/out/real_models/manifest.json").read_text())["models"]
}


def agreement(reference, candidate, samples):
    entry = ENTRY_BY_MODEL[Path(__file__).stem.removeprefix("task_metric_")]
    names = list(reference[0])
    return _agreement(entry, [[r[n] for n in names] for r in reference], [[c[n] for n in names] for c in candidate])
