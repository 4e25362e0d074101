#!/usr/bin/env bash
# Parity on a second real execution provider: OpenVINO, through onnxruntime-openvino, on x86 CPUs.
#
# onnxruntime-openvino REPLACES onnxruntime (same `onnxruntime` module, plus OpenVINOExecutionProvider),
# so it lives in its own venv, .venv-openvino (git-ignored by the `.venv-*` pattern). The project is
# installed there with --no-deps so pip never pulls plain onnxruntime back in.
#
# For every sample model: `onnxslim check M M --data M/eval --providers cpu,openvino`, and assert the
# outcome is exit 0 (OpenVINO ran and agrees with itself), or exit 1 with a clearly reported OpenVINO
# failure (installed but could not run the model fails the gate; it is never a silent skip). Prints one line per model saying which. Idempotent: an existing, working venv
# is reused. Exits 0 with "skipped: <reason>" when onnxruntime-openvino cannot be installed here.
#
# Usage: .ci/check_openvino.sh [--python PYTHON]   (default: python3.11, else python3)
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
START=$(date +%s)
VENV=.venv-openvino
OUT=${TMPDIR:-/tmp}/onnxslim-openvino-check
PYTHON=""
if [ "${1:-}" = "--python" ]; then PYTHON=${2:?--python needs a path}; fi
if [ -z "$PYTHON" ]; then PYTHON=$(command -v python3.11 || command -v python3 || true); fi

skip() { echo "skipped: $*"; echo "elapsed: $(( $(date +%s) - START ))s"; exit 0; }
elapsed() { echo "elapsed: $(( $(date +%s) - START ))s"; }

[ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ] || skip "onnxruntime-openvino wheels are for x86_64 Linux/Windows; this is $(uname -s)-$(uname -m)"
[ -n "$PYTHON" ] || skip "no python3 found; pass --python PATH"

ready() {
    "$VENV/bin/python" - <<'EOF' 2>/dev/null
import importlib.metadata as md, onnxruntime as ort, onnxslim, onnx_graphsurgeon  # noqa: F401
assert "OpenVINOExecutionProvider" in ort.get_available_providers()
try:
    md.version("onnxruntime")
    raise SystemExit("plain onnxruntime is installed next to onnxruntime-openvino")
except md.PackageNotFoundError:
    pass
EOF
}

if ready; then
    echo "reusing $VENV"
else
    echo "creating $VENV with $PYTHON ($("$PYTHON" --version 2>&1))"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV" || skip "could not create a venv with $PYTHON"
    log=$(mktemp)
    if ! "$VENV/bin/pip" install -q onnxruntime-openvino onnx onnx-graphsurgeon numpy rich pyyaml >"$log" 2>&1; then
        reason=$(grep -m1 -iE "error|no matching" "$log" || tail -n1 "$log")
        rm -rf "$VENV" "$log"
        skip "pip could not install onnxruntime-openvino here: $reason"
    fi
    if ! "$VENV/bin/pip" install -q --no-deps -e . >"$log" 2>&1; then
        cat "$log"; rm -f "$log"; echo "FAILED: could not install onnxslim into $VENV"; exit 1
    fi
    rm -f "$log"
    if ! ready; then
        msg=$("$VENV/bin/python" -c "import onnxruntime as o; print(o.get_available_providers())" 2>&1 | tail -n1)
        skip "onnxruntime-openvino installed but OpenVINOExecutionProvider is not available: $msg"
    fi
fi
"$VENV/bin/python" -c "import onnxruntime as o, onnx; print('onnxruntime-openvino', o.__version__, 'onnx', onnx.__version__, o.get_available_providers())"

mkdir -p "$OUT"
failed=0
models=$("$VENV/bin/python" -c "import json; print(' '.join(m['name'] for m in json.load(open('sample_models/manifest.json'))['models']))")
for name in $models; do
    model=sample_models/$name/model.onnx
    report=$OUT/$name.json
    rm -f "$report"
    "$VENV/bin/onnxslim" check "$model" "$model" --data "sample_models/$name/eval" --providers cpu,openvino \
        --report "$report" -q >"$OUT/$name.txt" 2>&1
    rc=$?
    verdict=$("$VENV/bin/python" - "$report" "$rc" <<'EOF'
import json, sys
path, rc = sys.argv[1], int(sys.argv[2])
try:
    d = json.load(open(path))
except (OSError, ValueError):
    print("BAD no report"); raise SystemExit
ov = "OpenVINOExecutionProvider"
skipped = [s["reason"] for s in d["providers"]["skipped"] if s["provider"] == ov]
failed = [s["reason"] for s in d["providers"].get("failed", []) if s["provider"] == ov]
run = next((r for r in d["runs"] if r["provider"] == ov), None)
drift = ""
if run:
    worst = max((m.get("max_abs", 0.0) for m in run["provider_drift"].values()), default=0.0)
    drift = f", OpenVINO vs CPU drift max|d| {worst:.3g}"
    acc = run.get("task")
    if acc:
        drift += f", accuracy on OpenVINO {acc['candidate']:.4f}"
if rc == 0 and run:
    print(f"OK openvino ran (session providers {run['session_providers']}){drift}")
elif rc == 1 and failed:
    # Installed but cannot run this model: the gate must fail (exit 1) and say why.
    print("OK openvino failure reported (gate failed): " + "; ".join(failed))
elif rc == 1 and any("OpenVINO" in f for f in d["failures"]):
    print("OK openvino disagreement reported: " + "; ".join(f for f in d["failures"] if "OpenVINO" in f))
else:
    print(f"BAD rc={rc}: " + "; ".join(d["failures"]))
EOF
)
    echo "$name: rc=$rc $verdict"
    case "$verdict" in OK*) ;; *) failed=1; sed 's/^/    /' "$OUT/$name.txt" ;; esac
done
elapsed
if [ $failed -ne 0 ]; then echo "FAILED: see the lines marked BAD"; exit 1; fi
echo "all sample models: outcome as expected"
