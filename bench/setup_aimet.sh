#!/usr/bin/env bash
# Create bench/.venv-aimet for the third int8 peer of bench/real_models/run_real_peers.py:
#   aimet-onnx (Qualcomm AIMET, ONNX post-training static quantization; pinned below)
#   onnxruntime / onnx pinned to the versions of /work/main/.venv (the evaluation runs there anyway)
#   torch: aimet-onnx requires it; the CPU wheel from PyPI (or the local find-links wheel).
# Never install these into /work/main/.venv.  Writes the resolved versions to
# bench/out/aimet_versions.txt and the pip log to bench/out/setup_aimet.log.
# Other pins: PEER_AIMET=2.41.0 bash bench/setup_aimet.sh
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(dirname "$HERE")"
VENV="$HERE/.venv-aimet"
PY="${PYTHON:-python3}"
AIMET_VER="${PEER_AIMET:-2.42.0}"
mkdir -p "$HERE/out"
LOG="$HERE/out/setup_aimet.log"
: >"$LOG"

ORT_VER="$("$ROOT/.venv/bin/python" -c 'import onnxruntime; print(onnxruntime.__version__)')"
ONNX_VER="$("$ROOT/.venv/bin/python" -c 'import onnx; print(onnx.__version__)')"
echo "ours: onnxruntime==$ORT_VER onnx==$ONNX_VER; installing aimet-onnx==$AIMET_VER" | tee -a "$LOG"

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip >>"$LOG" 2>&1 || true
# torch first, so that aimet-onnx's unpinned "torch" is already satisfied by a CPU build: the PyTorch CPU index
# if it answers, else a local "+cpu" wheel that pip's find-links offers, else PyPI's default wheel (it runs on CPU
# but pulls CUDA libraries).  Pin with PEER_TORCH=2.13.0+cpu.
if [ -n "${PEER_TORCH:-}" ]; then
  "$VENV/bin/pip" install -q "torch==$PEER_TORCH" >>"$LOG" 2>&1
elif timeout 15 "$VENV/bin/python" -c 'import urllib.request as u; u.urlopen("https://download.pytorch.org/whl/cpu/", timeout=10)' 2>/dev/null; then
  "$VENV/bin/pip" install -q torch --index-url https://download.pytorch.org/whl/cpu >>"$LOG" 2>&1
else
  CPU_WHEEL="$(ls ${PIP_FIND_LINKS:-/opt/wheels}/torch-*+cpu-cp3*.whl 2>/dev/null | sort -V | tail -1 || true)"
  if [ -n "$CPU_WHEEL" ]; then
    echo "torch: CPU index not reachable; using the local wheel $(basename "$CPU_WHEEL")" | tee -a "$LOG"
    "$VENV/bin/pip" install -q "$CPU_WHEEL" >>"$LOG" 2>&1
  else
    echo "torch: CPU index not reachable and no local +cpu wheel; PyPI's default torch" | tee -a "$LOG"
    "$VENV/bin/pip" install -q torch >>"$LOG" 2>&1
  fi
fi
# Keep that torch: aimet-onnx -> onnx2torch -> torchvision would otherwise pull the newest (CUDA) torch with it.
TORCH_VER="$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("torch"))')"
PINS="$HERE/out/.aimet_pins.txt"
printf 'torch==%s\nonnxruntime==%s\nonnx==%s\n' "$TORCH_VER" "$ORT_VER" "$ONNX_VER" >"$PINS"
"$VENV/bin/pip" install -q -c "$PINS" "aimet-onnx==$AIMET_VER" "onnxruntime==$ORT_VER" "onnx==$ONNX_VER" >>"$LOG" 2>&1
"$VENV/bin/python" -I -c 'import aimet_onnx, onnxruntime; print("aimet_onnx imports; onnxruntime", onnxruntime.__version__)' \
  2>&1 | tail -1 | tee -a "$LOG"

"$VENV/bin/python" -I - <<'PY' | tee "$HERE/out/aimet_versions.txt"
import importlib.metadata as md
for d in ("aimet-onnx", "onnxruntime", "onnx", "numpy", "torch", "onnxscript", "onnx-ir"):
    try:
        print(f"{d}=={md.version(d)}")
    except md.PackageNotFoundError:
        print(f"{d}==NOT-INSTALLED")
PY
