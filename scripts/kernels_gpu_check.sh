#!/usr/bin/env bash
# One GPU call for the chunk kernels (under 10 minutes, each part under its own timeout): the
# GPU tests of the 16-bit default (the solve at 2 stages, the state passes in runs), of the
# Pallas cumsum launch and of the Mosaic GPU state pass; the forward's launches alone at 4x4096
# with the cumsum in XLA and in Pallas (`--sweep "fwd diag"`, its first two variants); the op
# beside fla at the three shapes under the default, with `cumsum=pallas` and (4x4096, 1x16384)
# with the state pass in Mosaic GPU, alone and with the Pallas cumsum (fla's cold autotuning
# took >215 s for two shapes, so each shape runs in its own process and limit).
# Run from the repository root: bash scripts/kernels_gpu_check.sh [OUT_DIR]
# Each part runs even when an earlier one fails; the exit status is non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-/tmp}}"
export PYTHONPATH="$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
status=0
timeout 120 python3 -m pytest -q -m gpu tests/test_pallas_gpu.py -p no:cacheprovider \
  -k "cumsum_launch or state_pass_in_runs or bfloat16_production_heads or mosaic_state" \
  > "$out/tests.log" 2>&1 || status=1
tail -3 "$out/tests.log"
timeout 80 python3 benchmarks/bench_kernels.py --shapes 4x4096 --structures split_prep --forward \
  --no-fla --sweep "fwd diag" --sweep-limit 2 --iters 10 > "$out/bench_kernels.log" 2>&1 || status=1
grep -v -i warn "$out/bench_kernels.log" | tail -10
mosaic=(state_lowering=mosaic cumsum=pallas,state_lowering=mosaic)
for shape in 4x4096 1x16384 8x2048; do
  configs=(cumsum=pallas) limit=90
  [[ $shape != 8x2048 ]] && configs+=("${mosaic[@]}") limit=150
  timeout $limit python3 benchmarks/bench_ops.py --backends pallas --iters 10 --shapes "$shape" \
    --configs "${configs[@]}" > "$out/bench_ops_$shape.log" 2>&1 || status=1
  grep -v -i warn "$out/bench_ops_$shape.log" | tail -5
done
exit $status
