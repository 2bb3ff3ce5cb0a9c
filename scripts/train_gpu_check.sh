#!/usr/bin/env bash
# One GPU call for the 1.3B training step (about 8 minutes): bench_train.py at one preset and
# one shape per process (a process that runs out of time still leaves the others' rows), the
# recurrent preset beside the PyTorch + fla peer, then the hybrid.
# Run from the repository root: bash scripts/train_gpu_check.sh [OUT_DIR] [SHAPE] [dot-merger]
# (with "dot-merger": the recurrent step with XLA's DotMerger on and off instead).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-/tmp}}"
shape="${2:-8x2048}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
if [[ "${3:-}" == "dot-merger" ]]; then
  # XLA's DotMerger concatenates the projection weights that share an input on every call; in
  # the decoding loop that cost a quarter of the step (benchmarks/RESULTS.md, 2026-12-07). The
  # recurrent train step with it and without it, one process each.
  for merger in on off; do
    flags=""
    [[ $merger == off ]] && flags=--xla_gpu_dot_merger_threshold_mb=0
    XLA_FLAGS="$flags" timeout 240 python3 benchmarks/bench_train.py --presets gdn2-1.3b \
      --shapes "$shape" --no-peer --json "$out/train_gdn2_merger_$merger.json" 2>&1 \
      | tee "$out/train_gdn2_merger_$merger.log" || status=1
  done
  exit $status
fi
timeout 300 python3 benchmarks/bench_train.py --presets gdn2-1.3b --shapes "$shape" \
  --json "$out/train_gdn2_$shape.json" 2>&1 | tee "$out/train_gdn2_$shape.log" || status=1
timeout 200 python3 benchmarks/bench_train.py --presets hybrid-1.3b --shapes "$shape" --no-peer \
  --json "$out/train_hybrid_$shape.json" 2>&1 | tee "$out/train_hybrid_$shape.log" || status=1
exit $status
