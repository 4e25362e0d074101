"""The third int8 peer: Qualcomm AIMET (``aimet-onnx``) post-training static quantization, exported as ONNX QDQ.

Runs inside ``bench/.venv-aimet`` (made by ``bench/setup_aimet.sh``) with ``python -I``, in the style of
``run_int8._peer_worker``; ``quant_cmd`` gives the command line for it and falls back to ``run_int8._quant_cmd`` for
the other tools.  Recipe (aimet-onnx's defaults, its quantization workflow: QuantSim, calibrate, export QDQ):

    sim = QuantizationSimModel(model, param_type="int8", activation_type="int8", quant_scheme="min_max",
                               config_file="default")   # "default" = default_config_per_channel.json
    sim.compute_encodings(calibration feeds)               # all feeds of the model's calib folder
    onnx.save(sim.to_onnx_qdq(prequantize_constants=True), dst)

preceded by ``fold_all_batch_norms_to_weight(model)`` (the step QuantSim's own warning asks for), and with the
first calibration feed as ``dummy_input``.  Where ``to_onnx_qdq`` cannot run (it draws a random input from the
declared input shapes, and fails on dim_value -1), ``sim.export`` + ``encodings_to_onnx_qdq`` (aimet-onnx's other
documented route to a QDQ model) is used; the row records which (``info.export``).

``prequantize_constants=True`` stores weights as int8 initializers followed by DequantizeLinear (the default,
False, keeps them as float tensors with QuantizeLinear + DequantizeLinear, which onnxruntime folds back at load
time: same numbers, a file as large as the fp32 one).  Activations are exported as uint8 (``to_onnx_qdq``'s
default ``force_activation_as="unsigned"``).

    bench/.venv-aimet/bin/python -I bench/quantize_with_aimet.py _quant aimet SRC DST CALIB_DIR
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
PEER3_PY = BENCH / ".venv-aimet" / "bin" / "python"
PEER3 = "aimet"
VERSIONS_FILE = BENCH / "out" / "aimet_versions.txt"

sys.path.insert(0, str(BENCH))
from run_int8 import _load_npz_dir, _quant_cmd  # noqa: E402  (stdlib-only at import time)


def aimet_worker(src: str, dst: str, calib: str) -> None:
    """Quantize ``src`` to ``dst`` with aimet-onnx's default PTQ recipe; prints one ``BENCH_INFO`` line."""
    import importlib.metadata as md

    import onnx
    from aimet_onnx.batch_norm_fold import fold_all_batch_norms_to_weight
    from aimet_onnx.quantsim import QuantizationSimModel, encodings_to_onnx_qdq

    t0 = time.perf_counter()
    feeds = [{k: v for k, v in f.items() if not k.startswith("__")} for f in _load_npz_dir(calib)]
    model = onnx.load(src)
    conv_bn, bn_conv = fold_all_batch_norms_to_weight(model)  # what QuantSim's warning asks for; a no-op without BN
    export = "to_onnx_qdq"
    with tempfile.TemporaryDirectory(prefix="aimet-") as tmp:
        sim = QuantizationSimModel(
            model,
            param_type="int8",
            activation_type="int8",
            quant_scheme="min_max",
            config_file="default",
            dummy_input=feeds[0],
            path=tmp,
        )
        sim.compute_encodings(feeds)
        try:
            qdq = sim.to_onnx_qdq(prequantize_constants=True)
        except ValueError as e:
            # to_onnx_qdq draws a random input from the declared input shapes (make_dummy_input), which fails on
            # inputs declared with dim_value -1 (paddle2onnx exports).  aimet-onnx's other documented way to a QDQ
            # model: sim.export (model + encodings), then encodings_to_onnx_qdq.
            if "negative dimensions" not in str(e):
                raise
            export = "export+encodings_to_onnx_qdq"
            sim.export(tmp, "sim")
            qdq = encodings_to_onnx_qdq(
                str(Path(tmp) / "sim.onnx"), str(Path(tmp) / "sim.encodings"), prequantize_constants=True
            )
    onnx.save(qdq, dst)
    info = {
        "aimet_onnx": md.version("aimet-onnx"),
        "n_calib": len(feeds),
        "bn_folded": len(conv_bn) + len(bn_conv),
        "export": export,
        "seconds_inside": round(time.perf_counter() - t0, 3),
    }
    print("BENCH_INFO " + json.dumps(info))


def quant_cmd(tool: str, src: Path, dst: Path, calib: Path) -> list[str]:
    if tool == PEER3:
        return [str(PEER3_PY), "-I", str(Path(__file__).resolve()), "_quant", tool, str(src), str(dst), str(calib)]
    return _quant_cmd(tool, src, dst, calib)


def versions() -> list[str]:
    """Resolved versions in the peer venv (asked live; the setup script's record when the venv is absent)."""
    import subprocess

    code = (
        "import importlib.metadata as md\nfor d in ('aimet-onnx','onnxruntime','onnx','numpy','torch'):\n"
        "    try: print(f'{d}=={md.version(d)}')\n    except md.PackageNotFoundError: print(f'{d}==NOT-INSTALLED')"
    )
    if PEER3_PY.exists():
        p = subprocess.run([str(PEER3_PY), "-I", "-c", code], capture_output=True, text=True, timeout=120)
        if p.returncode == 0:
            return p.stdout.split()
    return VERSIONS_FILE.read_text().split() if VERSIONS_FILE.exists() else ["bench/.venv-aimet missing"]


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "_quant" and sys.argv[2] == PEER3:
        aimet_worker(*sys.argv[3:6])
    else:
        raise SystemExit(__doc__.rsplit("\n\n", 1)[-1])
