#!/usr/bin/env bash
# Create bench/.venv-peers holding the PyPI peers we benchmark against:
#   onnxslim (the PyPI OnnxSlim -- same import name as ours, hence its own venv)
#   onnxsim  (onnx-simplifier)
# plus onnxruntime/onnx/numpy and onnx_ir (onnxruntime's MatMulNBits quantizer imports it).
# Never install these into /work/main/.venv.
# Writes the resolved versions to bench/out/peer_versions.txt.
# Default: the latest releases. To reproduce an older run, pin them:
#   PEER_ONNXSLIM=0.1.98 PEER_ONNXSIM=0.8.1 bash bench/setup_peers.sh
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
VENV="$HERE/.venv-peers"
PY="${PYTHON:-python3}"
mkdir -p "$HERE/out"
LOG="$HERE/out/setup_peers.log"
: >"$LOG"

echo "== available versions (pip index) ==" | tee -a "$LOG"
for p in onnxslim onnxsim; do
  "$PY" -m pip index versions "$p" 2>/dev/null | head -1 | tee -a "$LOG" || true
done

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip >>"$LOG" 2>&1 || true
"$VENV/bin/pip" install -q onnx onnxruntime numpy onnx_ir 2>&1 | tee -a "$LOG"
"$VENV/bin/pip" install -q --upgrade "onnxslim${PEER_ONNXSLIM:+==$PEER_ONNXSLIM}" 2>&1 | tee -a "$LOG"
# onnxsim ships manylinux wheels for some Pythons only; a source build needs
# cmake + a C++ toolchain and may fail -- record it instead of aborting.
if ! "$VENV/bin/pip" install -q --upgrade "onnxsim${PEER_ONNXSIM:+==$PEER_ONNXSIM}" >>"$LOG" 2>&1; then
  echo "onnxsim: INSTALL FAILED (see $LOG)" | tee -a "$LOG"
  tail -5 "$LOG"
fi

# -I: isolated, so an onnxslim checkout in the current folder cannot shadow the peer
"$VENV/bin/python" -I - <<'PY' | tee "$HERE/out/peer_versions.txt"
import importlib.metadata as md
import onnxslim
assert "site-packages" in onnxslim.__file__, onnxslim.__file__
for d in ("onnxslim", "onnxsim", "onnx", "onnxruntime", "numpy"):
    try:
        print(f"{d}=={md.version(d)}")
    except md.PackageNotFoundError:
        print(f"{d}==NOT-INSTALLED")
PY
