#!/usr/bin/env bash
# One GPU call for issue 14 (about 3 minutes on an H200): the fused decoding step's GPU tests,
# then the generation benchmark of the recurrent 1.3B model with the fused step at batch 1 and
# 64, and the per-layer step table (ours unfused, ours fused, fla's layer and op) at both.
# Run from the repository root: bash scripts/generate_gpu_check.sh [OUT_DIR]
# The benchmark runs even when a test fails; the exit status is non-zero if either failed.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-/tmp}}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
python3 -m pytest -q -m gpu tests/test_generate_gpu.py -p no:cacheprovider || status=1
python3 benchmarks/bench_generate.py --presets gdn2-1.3b --batches 1 64 \
  --variants gdn2_decode=fused --repeats 2 --layer-steps 100 \
  --json "$out/bench_generate.json" || status=1
exit $status
