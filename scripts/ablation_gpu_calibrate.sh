#!/usr/bin/env bash
# One GPU call for the 10M gate ablation's calibration (about 9 minutes): GDN-2 alone at two
# learning rates, 3 seeds, 32 rows per task and step, two processes side by side on the one
# GPU, each under its own time limit so that both report. The rate whose seeds leave the recall
# plateau sets `--lr` for the six variants (two calls of three variants each). 2000 steps of 32
# rows see the sequences of 4000 steps of 16; the 2000-step, 16-row run of three processes took
# ~305 s each, so two processes of twice the rows should fit the limit.
# Run from the repository root: bash scripts/ablation_gpu_calibrate.sh [OUT_DIR] [STEPS]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-/tmp}}"
steps="${2:-2000}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" XLA_PYTHON_CLIENT_PREALLOCATE=false
status=0
for lr in 3e-4 1e-3; do
  timeout 540 python3 benchmarks/gate_ablation.py --preset h200 --variants gdn2 --seeds 3 \
    --rows 32 --lr "$lr" --steps "$steps" --out "$out/calib_lr$lr" --no-progress \
    > "$out/calib_lr$lr.log" 2>&1 &
done
for job in $(jobs -p); do wait "$job" || status=1; done
for lr in 3e-4 1e-3; do echo "== lr $lr"; grep -v -i warn "$out/calib_lr$lr.log" | tail -8; done
exit $status
