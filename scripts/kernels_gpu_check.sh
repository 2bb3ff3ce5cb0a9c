#!/usr/bin/env bash
# One GPU call for the chunk kernels (about 9 minutes, each part under its own timeout): the
# production-head GPU tests; Nsight Compute's counters for the forward diagonal launch under the
# column loop and the K-sliced `levels` variant (register use, occupancy, spills: the bound the
# 2026-12-07 profile named), then for one forward+backward of our best config without fla
# (fla's autotuning under ncu did not fit a call); and the op beside fla at two shapes under
# the configs whose launches `benchmarks/kernel_resources.py` (no GPU needed) compiles to fewer
# registers: `lean` = the levels diagonal at K slices of 16 on 4 warps (96 registers, 31% of
# an SM's warps, against 255 and 12.5%); `leaner` also the solve's score blocks in two K loops
# of 16 (64 bytes of spills a thread against 648) and the backward's diagonal and intra
# launches at 164 and 196 registers (`tests/test_pallas_gpu.py::test_lean_launches_...`);
# `leanest` also the state passes and the backward WY launch on 8 warps (216, 242 and 210
# registers, no spills, against 255 with 72, 24 and 200 bytes of spills a thread).
# Run from the repository root: bash scripts/kernels_gpu_check.sh [OUT_DIR]
# Each part runs even when an earlier one fails; the exit status is non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-/tmp}}"
export PYTHONPATH="$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
status=0
best=structure=split_prep,diag_inverse=doubling
lean=$best,diag_blocks=levels,diag_block_k=16,diag=4:1
leaner=$lean,intra_block_k=16,solve_scores=apart,intra_bwd_diag=4:1,intra_bwd_block_k=32
leanest=$leaner,state=8:2,dstate=8:2,wy=8:1
sections=(--section SpeedOfLight --section Occupancy --section LaunchStats
  --section SchedulerStats --section WarpStateStats --section MemoryWorkloadAnalysis)
timeout 240 python3 -m pytest -q -m gpu tests/test_pallas_gpu.py -p no:cacheprovider \
  -k "production_heads" > "$out/tests.log" 2>&1 || status=1
tail -3 "$out/tests.log"
profile() {  # name, seconds, then ncu's own options and the profiled command
  local name=$1 limit=$2
  shift 2
  timeout "$limit" ncu --clock-control none --profile-from-start off "${sections[@]}" --csv \
    --page details "$@" > "$out/ncu_$name.csv" 2> "$out/ncu_$name.log" || status=1
  python3 benchmarks/profile_kernels.py --summarize "$out/ncu_$name.csv" | tee "$out/ncu_$name.md"
}
diag=(--kernel-name regex:chunk_fwd_diag python3 benchmarks/profile_kernels.py --no-fla)
profile diag_loop 60 "${diag[@]}" --config "$best"
profile diag_lean 60 "${diag[@]}" --config "$lean"
profile ours 150 python3 benchmarks/profile_kernels.py --no-fla --config "$best"
timeout 200 python3 benchmarks/bench_ops.py --backends pallas --iters 10 --shapes 4x4096 1x16384 \
  --configs "$best" "$lean" "$leaner" "$leanest" > "$out/bench_ops.log" 2>&1 || status=1
grep -v -i warn "$out/bench_ops.log" | tail -20
exit $status
