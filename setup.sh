#!/usr/bin/env bash
# Sets graphopt up in ./.venv and runs the main job on the built-in default model:
# tiny-llama (random weights, fixed seed) -> per-network ONNX -> greedy generation in onnxruntime.
#   ./setup.sh                 install, then compile and generate
#   ./setup.sh --install-only  install only (what .ci/run uses)
# pip keeps its downloads in ~/.cache/pip, so a second run is fast.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 10), "graphopt needs Python >= 3.10"'
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# The CPU build of torch first: a loose `torch` requirement in a fresh venv can pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
[ "${1:-}" = "--install-only" ] && exit 0

.venv/bin/graphopt run tiny-llama --target onnx --out graphopt-out/tiny-llama
.venv/bin/graphopt generate graphopt-out/tiny-llama --input-ids 1,17,300,42,5,900,64,7 --max-new-tokens 16 --ignore-eos
