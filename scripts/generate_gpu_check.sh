#!/usr/bin/env bash
# One GPU call for issue 14 (about 9 minutes, each part under its own timeout): the decoding GPU
# tests; the launch-by-launch profile of one 1.3B decoding step at batch 1 with the defaults
# (two rows for one, no DotMerger in the decoding programs) and with XLA's DotMerger
# (`--merge-dots`, whose weight concatenations took a quarter of the step on 2026-12-07); the
# generation benchmark at batch 1 and 64, merger off and on; then batch 64's profile over 16
# steps with XLA's loop unrolling off (the 16-step program asked for 77 GiB while generate's
# 255-step one runs).
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
timeout 200 python3 -m pytest -q -m gpu tests/test_generate_gpu.py -p no:cacheprovider \
  > "$out/tests.log" 2>&1 || status=1
tail -3 "$out/tests.log"
profile b1 60 --batch 1
profile b1_merged 60 --batch 1 --merge-dots
timeout 150 python3 benchmarks/bench_generate.py --presets gdn2-1.3b --batches 1 \
  --merge-dots off on --repeats 2 --no-layers --json "$out/generate_b1.json" \
  > "$out/generate_b1.log" 2>&1 || status=1
timeout 150 python3 benchmarks/bench_generate.py --presets gdn2-1.3b --batches 64 \
  --merge-dots off on --repeats 2 --no-layers --json "$out/generate_b64.json" \
  > "$out/generate_b64.log" 2>&1 || status=1
grep -v -i warn "$out/generate_b1.log" "$out/generate_b64.log" | grep -v "^.*: *$"
XLA_FLAGS=--xla_gpu_enable_while_loop_unrolling=WHILE_LOOP_UNROLLING_NO_UNROLL \
  profile b64_no_unroll 90 --batch 64
exit $status
