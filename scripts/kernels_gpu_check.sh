#!/usr/bin/env bash
# One GPU call for the chunk kernels (under 10 minutes, each part under its own timeout):
# Nsight Compute's counters for the forward solve launch under the 16-bit default (the prep
# split, the diagonal column loop over K slices of 32) with its score loop over K slices of 32
# and 16 (`intra_block_k`: 648 and 32 B of spills a thread by `benchmarks/kernel_resources.py`);
# the op beside fla at the three shapes under the default, the previous default (the fused
# forward) and the slices of 16; then the production-head GPU tests.
# Run from the repository root: bash scripts/kernels_gpu_check.sh [OUT_DIR]
# Each part runs even when an earlier one fails; the exit status is non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-/tmp}}"
export PYTHONPATH="$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
status=0
fused=structure=fused,diag_inverse=substitution,diag_loop_block_k=none
sections=(--section SpeedOfLight --section Occupancy --section LaunchStats
  --section SchedulerStats --section WarpStateStats --section MemoryWorkloadAnalysis)
for bk in 32 16; do
  timeout 50 ncu --clock-control none --profile-from-start off "${sections[@]}" --csv \
    --page details --kernel-name regex:chunk_fwd_solve python3 benchmarks/profile_kernels.py \
    --no-fla --config "intra_block_k=$bk" > "$out/ncu_solve_k$bk.csv" \
    2> "$out/ncu_solve_k$bk.log" || status=1
  python3 benchmarks/profile_kernels.py --summarize "$out/ncu_solve_k$bk.csv"
done
# fla's cold autotuning and the configs' compiles: one shape with four configs took ~180 s.
for shape in 1x16384 8x2048; do
  timeout 170 python3 benchmarks/bench_ops.py --backends pallas --iters 10 --shapes "$shape" \
    --configs "$fused" intra_block_k=16 > "$out/bench_ops_$shape.log" 2>&1 || status=1
  grep -v -i warn "$out/bench_ops_$shape.log" | tail -5
done
timeout 100 python3 -m pytest -q -m gpu tests/test_pallas_gpu.py -p no:cacheprovider \
  -k "production_heads" > "$out/tests.log" 2>&1 || status=1
tail -3 "$out/tests.log"
exit $status
