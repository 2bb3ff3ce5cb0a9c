#!/usr/bin/env bash
# One GPU call for the chunk kernels (about 8 minutes with fla's autotuning cold): the GPU tests
# of the production heads (K = 256 included, where the reverse state pass now runs one stage)
# under the default and the split forward; Nsight Compute's counters for one forward+backward of
# the best measured config and of fla's kernels (per-launch time, DRAM bandwidth, SM use); and
# the op side by side with fla at the three benchmark shapes under the default and that config.
# Run from the repository root: bash scripts/kernels_gpu_check.sh [OUT_DIR]
# Each part runs even when an earlier one fails; the exit status is non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-/tmp}}"
export PYTHONPATH="$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
status=0
best=structure=split_prep,diag_inverse=doubling
python3 -m pytest -q -m gpu tests/test_pallas_gpu.py -p no:cacheprovider \
  -k "production_heads" 2>&1 | tee "$out/tests.log" || status=1
ncu --clock-control none --profile-from-start off --section SpeedOfLight --section Occupancy \
  --section LaunchStats --section ComputeWorkloadAnalysis --section SchedulerStats \
  --section WarpStateStats --section MemoryWorkloadAnalysis --csv --page details \
  python3 benchmarks/profile_kernels.py --shape 4x4096 --config "$best" > "$out/ncu.csv" \
  2> "$out/ncu.log" || status=1
python3 benchmarks/profile_kernels.py --summarize "$out/ncu.csv" | tee "$out/ncu_summary.md" \
  || status=1
python3 benchmarks/bench_ops.py --backends pallas --configs "$best" 2>&1 \
  | tee "$out/bench_ops.log" || status=1
exit $status
