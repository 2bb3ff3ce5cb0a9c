#!/usr/bin/env bash
# One GPU call for the chunk kernels (about 8 minutes with fla's autotuning cold): the GPU tests
# of the token-parallel diagonal launch and of the split forward, the diagonal launch alone
# under each grid (`--sweep "fwd diag"`, its token variants first), and the op side by side
# with fla's chunk_gdn2 at the three benchmark shapes under the default config, the best split
# measured so far, and that split with the token grid.
# Run from the repository root: bash scripts/kernels_gpu_check.sh [OUT_DIR]
# Each part runs even when an earlier one fails; the exit status is non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-/tmp}}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
python3 -m pytest -q -m gpu tests/test_pallas_gpu.py -p no:cacheprovider \
  -k "token_diagonal or split_structure_production" 2>&1 | tee "$out/tests.log" || status=1
python3 benchmarks/bench_kernels.py --shapes 4x4096 1x16384 --structures split_prep --forward \
  --no-fla --iters 10 --sweep "fwd diag" --sweep-limit 4 2>&1 | tee "$out/bench_kernels.log" \
  || status=1
best=structure=split_prep,diag_inverse=doubling
python3 benchmarks/bench_ops.py --backends pallas --configs "$best" "$best,diag_grid=token" \
  2>&1 | tee "$out/bench_ops.log" || status=1
exit $status
