"""Regenerate every sample model, its calib/eval data and manifest.json.

Run from the repo root with the build venv:  python sample_models/scripts/make_all.py
Each model is built in its own subprocess (fresh seeds / thread settings).
"""

import json
import subprocess
import sys
from pathlib import Path

import common

HERE = Path(__file__).resolve().parent


def main(names=None):
    names = names or common.MODEL_ORDER
    for name in names:
        print(f"=== {name} ===", flush=True)
        subprocess.run([sys.executable, str(HERE / f"make_{name}.py")], check=True)
    # drop manifest entries whose model folder no longer exists
    data = json.loads(common.MANIFEST.read_text())
    data["models"] = [m for m in data["models"] if (common.SAMPLE_DIR / m["path"]).exists()]
    common.MANIFEST.write_text(json.dumps(data, indent=2) + "\n")
    for m in data["models"]:
        print(
            f"{m['name']:18s} opset {m['opset']:2d}  acc {m['float_metric']:.4f}  "
            f"{m['size_bytes']:7d} B  {m['exporter']}"
        )


if __name__ == "__main__":
    main(sys.argv[1:] or None)
