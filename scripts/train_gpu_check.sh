#!/usr/bin/env bash
# One GPU call for the 1.3B training step (about 8 minutes): bench_train.py at one preset and
# one shape per process (a process that runs out of time still leaves the others' rows), the
# recurrent preset beside the PyTorch + fla peer, then the hybrid.
# Run from the repository root: bash scripts/train_gpu_check.sh [OUT_DIR] [SHAPE]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-/tmp}}"
shape="${2:-8x2048}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
timeout 300 python3 benchmarks/bench_train.py --presets gdn2-1.3b --shapes "$shape" \
  --json "$out/train_gdn2_$shape.json" 2>&1 | tee "$out/train_gdn2_$shape.log" || status=1
timeout 200 python3 benchmarks/bench_train.py --presets hybrid-1.3b --shapes "$shape" --no-peer \
  --json "$out/train_hybrid_$shape.json" 2>&1 | tee "$out/train_hybrid_$shape.log" || status=1
exit $status
