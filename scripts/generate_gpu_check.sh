#!/usr/bin/env bash
# One GPU call for issue 14 (under 9 minutes, each part under its own timeout): the decoding GPU
# tests; the launch-by-launch profile of one 1.3B decoding step at batch 1 with the defaults
# (two rows for one, no DotMerger, the projections' kernels concatenated once before the loop)
# (its profile with the projections apart, `--separate-projections`, is the 2026-12-07 fourth
# session's: 1.886 ms a token on an H100) and of the batch-1 prefill of 2048 tokens; the
# generation benchmark at batch 1 and 64 with the projections apart and together side by side.
# Run from the repository root: bash scripts/generate_gpu_check.sh [OUT_DIR]
# Each part runs even when an earlier one fails; the exit status is non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-/tmp}}"
export PYTHONPATH="$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
status=0
profile() {  # name, seconds, profile_decode options...
  local name=$1 limit=$2
  shift 2
  timeout "$limit" python3 benchmarks/profile_decode.py --preset gdn2-1.3b \
    --json "$out/profile_$name.json" "$@" > "$out/profile_$name.log" 2>&1 || status=1
  grep -v -i warn "$out/profile_$name.log" | head -16
}
timeout 110 python3 -m pytest -q -m gpu tests/test_generate_gpu.py -p no:cacheprovider \
  -k "concatenated or dot_merger or greedy" > "$out/tests.log" 2>&1 || status=1
tail -3 "$out/tests.log"
profile b1 60 --batch 1
profile prefill_b1 60 --batch 1 --prompt-len 2048 --prefill  # 27.4 ms against a 15 ms target
# Batch 64 also times the fused layer step's tiles and warps (4 warps at block_v 32: 71
# registers, 44% occupancy, against 121 and 25% with the derived 2; kernel_resources-style).
layers=(--no-layers)
for b in 1 64; do
  [ "$b" = 64 ] && layers=(--no-fla --layer-steps 100 --decode-block-v 32 16 --decode-warps 2 4)
  timeout $((b == 1 ? 150 : 200)) python3 benchmarks/bench_generate.py --presets gdn2-1.3b \
    --batches "$b" --concat-projections off on --repeats 2 "${layers[@]}" \
    --json "$out/generate_b$b.json" > "$out/generate_b$b.log" 2>&1 || status=1
  grep -v -i warn "$out/generate_b$b.log" | grep -v "^.*: *$"
done
exit $status
