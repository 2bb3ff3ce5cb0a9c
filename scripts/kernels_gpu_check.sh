#!/usr/bin/env bash
# One GPU call for the chunk kernels (under 10 minutes, each part under its own timeout):
# Nsight Compute's counters for the forward diagonal launch with the column loop over whole K
# rows (255 registers, 12% occupancy on an H100: it issues in half its cycles) and over K
# slices of 32 and 16 (`diag_loop_block_k`: 126 and 78 registers by
# `benchmarks/kernel_resources.py`, no GPU needed); the op beside fla at 4x4096 under the three;
# then the production-head GPU tests. (The K-sliced `levels` diagonal took 1.8x the column
# loop's time at 2.5x its occupancy on 2026-12-07, so it is no longer timed here.)
# Run from the repository root: bash scripts/kernels_gpu_check.sh [OUT_DIR]
# Each part runs even when an earlier one fails; the exit status is non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-/tmp}}"
export PYTHONPATH="$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
status=0
best=structure=split_prep,diag_inverse=doubling
configs=("$best" "$best,diag_loop_block_k=32" "$best,diag_loop_block_k=16")
names=(whole k32 k16)
sections=(--section SpeedOfLight --section Occupancy --section LaunchStats
  --section SchedulerStats --section WarpStateStats --section MemoryWorkloadAnalysis)
for i in "${!configs[@]}"; do
  timeout 50 ncu --clock-control none --profile-from-start off "${sections[@]}" --csv \
    --page details --kernel-name regex:chunk_fwd_diag python3 benchmarks/profile_kernels.py \
    --no-fla --config "${configs[$i]}" > "$out/ncu_${names[$i]}.csv" \
    2> "$out/ncu_${names[$i]}.log" || status=1
  python3 benchmarks/profile_kernels.py --summarize "$out/ncu_${names[$i]}.csv"
done
# fla's cold autotuning and three configs' compiles: a two-shape run printed nothing in 230 s.
timeout 300 python3 benchmarks/bench_ops.py --backends pallas --iters 10 --shapes 4x4096 \
  --configs "${configs[@]}" > "$out/bench_ops.log" 2>&1 || status=1
grep -v -i warn "$out/bench_ops.log" | tail -12
timeout 120 python3 -m pytest -q -m gpu tests/test_pallas_gpu.py -p no:cacheprovider \
  -k "production_heads" > "$out/tests.log" 2>&1 || status=1
tail -3 "$out/tests.log"
exit $status
