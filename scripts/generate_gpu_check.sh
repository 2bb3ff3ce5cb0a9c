#!/usr/bin/env bash
# One GPU call for issue 14 (several minutes): the fused decoding step's GPU tests, the
# generation benchmark of the recurrent 1.3B model at batch 1 and 64 with the default (fused)
# and the unfused step, the per-layer step table (ours unfused, ours fused, fla's layer and op),
# and the launch-by-launch profile of one decoding step at both batches.
# Run from the repository root: bash scripts/generate_gpu_check.sh [OUT_DIR]
# Each part runs even when an earlier one fails; the exit status is non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-/tmp}}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
python3 -m pytest -q -m gpu tests/test_generate_gpu.py -p no:cacheprovider || status=1
for batch in 1 64; do
  python3 benchmarks/profile_decode.py --preset gdn2-1.3b --batch "$batch" \
    --json "$out/profile_decode_b$batch.json" || status=1
done
python3 benchmarks/bench_generate.py --presets gdn2-1.3b --batches 1 64 \
  --variants "" gdn2_decode=unfused --repeats 2 --layer-steps 100 \
  --json "$out/bench_generate.json" || status=1
exit $status
