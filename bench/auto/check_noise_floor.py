"""Is a task agreement below 1.0 the compression's doing, or the metric's own noise? Perturb a real model's
weights by less than any compression does (rounded to fp16; 1e-3 relative Gaussian noise, seeded) and print
the agreement with the original's decisions on the split ``run_auto.py`` judges on.

    .venv/bin/python bench/auto/check_noise_floor.py detector_yolov8n_nudenet ocr_det_dbnet
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "bench" / "auto"), str(ROOT / "bench" / "real_models")]
from decisions import agreement  # noqa: E402
from run_nncf_qwac import REAL, _feeds, eval_split  # noqa: E402

PERTURBATIONS = {
    "fp16 weights": lambda a: a.astype(np.float16).astype(np.float32),
    "1e-3 relative noise": lambda a: a * (1 + 1e-3 * np.random.default_rng(0).standard_normal(a.shape)),
}


def _outputs(model: onnx.ModelProto, feeds: list[dict]) -> list:
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [s.run(None, f) for f in feeds]


def main() -> None:
    entries = {e["name"]: e for e in json.loads((REAL / "manifest.json").read_text())["models"]}
    for name in sys.argv[1:]:
        d = REAL / name
        feeds = _feeds(eval_split(d))
        model = onnx.load(d / "model.onnx")
        reference = _outputs(model, feeds)
        for label, change in PERTURBATIONS.items():
            m = onnx.ModelProto()
            m.CopyFrom(model)
            for t in m.graph.initializer:
                a = numpy_helper.to_array(t)
                if a.dtype == np.float32 and a.size > 16:
                    t.CopyFrom(numpy_helper.from_array(np.asarray(change(a), dtype=np.float32), t.name))
            value = agreement(entries[name], reference, _outputs(m, feeds))
            print(f"{name}: {label}: agreement {value:.4f} on {len(feeds)} feeds", flush=True)


if __name__ == "__main__":
    main()
