#!/usr/bin/env bash
# Sets graphopt up in ./.venv, with TPU-MLIR in its own Python 3.10 venv under ~/.cache/graphopt,
# and runs the main job on the built-in default model: tiny-llama (random weights, fixed seed)
# -> per-network ONNX -> a W4BF16 bmodel for the BM1684X, checked in TPU-MLIR's simulator
# -> greedy generation with the bmodel in the simulator.
#   ./setup.sh                 install, then compile and generate
#   ./setup.sh --install-only  install only (what .ci/run uses)
# Another transformers release in a venv of its own (what CI runs the golden suite on):
#   ./setup.sh --install-only --venv .venv-transformers4 --transformers 4.51.3 --no-toolchain
# pip keeps its downloads in ~/.cache/pip and the toolchain stays in ~/.cache/graphopt, so a
# second run is fast.  Set GRAPHOPT_PYTHON310 if Python 3.10 is not found by itself.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
VENV=.venv
TRANSFORMERS=""   # empty: the newest release graphopt's requirements allow
INSTALL_ONLY=0
TOOLCHAIN=1
while [ $# -gt 0 ]; do
    case "$1" in
        --install-only) INSTALL_ONLY=1 ;;
        --no-toolchain) TOOLCHAIN=0 ;;
        --venv) VENV=$2; shift ;;
        --transformers) TRANSFORMERS=$2; shift ;;
        *) echo "setup.sh: unknown option '$1' (see the comment at the top of setup.sh)" >&2; exit 2 ;;
    esac
    shift
done
"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 10), "graphopt needs Python >= 3.10"'
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# The CPU build of torch first: a loose `torch` requirement in a fresh venv can pull a multi-GB CUDA build.
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -e ".[test]" ${TRANSFORMERS:+"transformers==$TRANSFORMERS"}
if [ "$TOOLCHAIN" = 1 ]; then
    "$VENV/bin/graphopt" toolchain install bm1684x  # does nothing when installed and checked already
fi
if [ "$INSTALL_ONLY" = 1 ]; then exit 0; fi

"$VENV/bin/graphopt" run tiny-llama --target bm1684x --quantize w4bf16 --out graphopt-out/tiny-llama-w4bf16
"$VENV/bin/graphopt" generate graphopt-out/tiny-llama-w4bf16 --backend bm1684x-sim \
    --input-ids 1,17,300,42,5,900,64,7 --max-new-tokens 16 --ignore-eos
