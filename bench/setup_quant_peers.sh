#!/usr/bin/env bash
# Create bench/.venv-quant-peers for the int8 benchmark peers:
#   onnxruntime (same version as /work/main/.venv, for quantize_static + quant_pre_process;
#               sympy: quant_pre_process needs it for symbolic shape inference)
#   nncf        (latest from PyPI; its ONNX backend needs only onnx + onnxruntime)
# Never install these into /work/main/.venv.  Writes the resolved versions to
# bench/out/quant_peer_versions.txt.  Pin with PEER_NNCF=... ; if nncf fails to
# install (or would pull torch) that is recorded and the benchmark runs without it.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(dirname "$HERE")"
VENV="$HERE/.venv-quant-peers"
PY="${PYTHON:-python3}"
mkdir -p "$HERE/out"
LOG="$HERE/out/setup_quant_peers.log"
: >"$LOG"

ORT_VER="$("$ROOT/.venv/bin/python" -c 'import onnxruntime; print(onnxruntime.__version__)')"
ONNX_VER="$("$ROOT/.venv/bin/python" -c 'import onnx; print(onnx.__version__)')"
echo "ours: onnxruntime==$ORT_VER onnx==$ONNX_VER" | tee -a "$LOG"
"$PY" -m pip index versions nncf 2>/dev/null | head -1 | tee -a "$LOG" || true

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip >>"$LOG" 2>&1 || true
"$VENV/bin/pip" install -q "onnxruntime==$ORT_VER" "onnx==$ONNX_VER" numpy sympy 2>&1 | tee -a "$LOG"
if ! "$VENV/bin/pip" install -q "nncf${PEER_NNCF:+==$PEER_NNCF}" >>"$LOG" 2>&1; then
  echo "nncf: INSTALL FAILED (see $LOG)" | tee -a "$LOG"
  tail -5 "$LOG"
fi
# nncf must not have replaced the pinned onnxruntime/onnx
"$VENV/bin/pip" install -q "onnxruntime==$ORT_VER" "onnx==$ONNX_VER" >>"$LOG" 2>&1 || true

"$VENV/bin/python" -I - <<'PY' | tee "$HERE/out/quant_peer_versions.txt"
import importlib.metadata as md
for d in ("onnxruntime", "onnx", "numpy", "sympy", "nncf", "torch"):
    try:
        print(f"{d}=={md.version(d)}")
    except md.PackageNotFoundError:
        print(f"{d}==NOT-INSTALLED")
PY
