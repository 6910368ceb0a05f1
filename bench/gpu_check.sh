#!/usr/bin/env bash
# GPU check of the ranking service (see bench/gpu_check.py), for a machine with an NVIDIA GPU.
#
# The machine is expected to have Python 3.12 with torch, grpcio, protobuf, prometheus-client,
# onnx and numpy. Carry these wheels (cp312, manylinux x86_64) into $WHEELS (default ./wheels):
#   onnxruntime-gpu (CUDA 12), pydantic, pydantic-core, pydantic-settings, python-dotenv,
#   typing-inspection, annotated-types, grpcio-health-checking and grpcio-reflection (same
#   release as the installed grpcio). For example, on a machine with network access:
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#     -d wheels onnxruntime-gpu pydantic-settings grpcio-health-checking==$(grpcio version) \
#     grpcio-reflection==$(grpcio version)
#
#   bench/gpu_check.sh                      # CUDA; writes bench/results/gpu.json and gpu.md
#   bench/gpu_check.sh --provider=cpu --duration-s=1 --users=2000 --items=5000   # a dry run
set -e
set -x
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-wheels}
if [ -d "$WHEELS" ]; then
  "$PYTHON" -m pip install --no-index --find-links "$WHEELS" onnxruntime-gpu pydantic-settings \
    grpcio-health-checking grpcio-reflection
fi
nvidia-smi || true
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m bench.gpu_check "$@"
