#!/usr/bin/env bash
# One GPU call for the 10M gate ablation's calibration (under 9 minutes): GDN-2 alone, 3 seeds,
# one process per learning rate side by side on the one GPU, each under its own time limit so
# that every one reports (its log has the eval curve every `eval_every` steps even when the
# limit cuts it). The rate whose seeds leave the recall plateau first sets `--lr` for the other
# variants; a process that finishes writes a gate_ablation.json that `--merge` takes as the
# gdn2 row of the same configuration. At 32 rows a process takes ~29 GiB: two fit an H100
# side by side, three did not (2026-12-07, benchmarks/RESULTS.md); one alone runs ~85 ms a step.
# Run from the repository root:
#   bash scripts/ablation_gpu_calibrate.sh [OUT_DIR] [STEPS] [ROWS] [LR ...]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-/tmp}}"
steps="${2:-1500}"
rows="${3:-32}"
shift $(($# < 3 ? $# : 3))
lrs=("${@:-3e-4 1e-3 3e-3}")
read -r -a lrs <<< "${lrs[*]}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" XLA_PYTHON_CLIENT_PREALLOCATE=false
status=0
for lr in "${lrs[@]}"; do
  timeout 520 python3 benchmarks/gate_ablation.py --preset h200 --variants gdn2 --seeds 3 \
    --rows "$rows" --lr "$lr" --steps "$steps" --out "$out/calib_lr$lr" --no-progress \
    > "$out/calib_lr$lr.log" 2>&1 &
done
for job in $(jobs -p); do wait "$job" || status=1; done
for lr in "${lrs[@]}"; do
  echo "== lr $lr"
  grep -v -i warn "$out/calib_lr$lr.log" | grep -E "step|gdn2 \||first" | tail -8
done
exit $status
