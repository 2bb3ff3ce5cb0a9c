#!/usr/bin/env bash
# One GPU call for issue 14: the fused decoding step's GPU tests, then the generation benchmark
# of the recurrent 1.3B model at batch 1 and 64 with each decoding step, and the per-layer step
# beside fla's. Run from the repository root: bash scripts/generate_gpu_check.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-/tmp}}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -m pytest -q -m gpu tests/test_generate_gpu.py -p no:cacheprovider
python3 benchmarks/bench_generate.py --presets gdn2-1.3b --batches 1 64 \
  --variants gdn2_decode=unfused gdn2_decode=fused --repeats 2 --layer-steps 100 \
  --json "$out/bench_generate.json"
