#!/usr/bin/env bash
# One GPU call for issue 14 (several minutes): the fused decoding step's GPU tests; the
# launch-by-launch profile of one decoding step of the recurrent 1.3B model at batch 1 and at
# batch 2 (whether a two-row projection escapes the multiply-and-reduce rewrite that a one-row
# dot gets, the costliest launches of the batch-1 profile); at batch 64 over 16 steps (with the
# decode module's optimized HLO kept), over 64 steps, and with XLA's loop unrolling off (the
# 16-step program asked for 77 GiB while generate's 255-step one runs); then the generation
# benchmark at batch 1 and 64 with the default (fused) and the unfused step and the per-layer
# step table (ours unfused, ours fused, fla's layer and op).
# Run from the repository root: bash scripts/generate_gpu_check.sh [OUT_DIR]
# Each part runs even when an earlier one fails; the exit status is non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-/tmp}}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
profile() {
  python3 benchmarks/profile_decode.py --preset gdn2-1.3b --json "$out/profile_$1.json" "${@:2}" \
    > "$out/profile_$1.log" 2>&1 || status=1
  grep -v -i warn "$out/profile_$1.log" | head -24
}
python3 -m pytest -q -m gpu tests/test_generate_gpu.py -p no:cacheprovider || status=1
profile b1 --batch 1
profile b2 --batch 2
dump=$(mktemp -d)
XLA_FLAGS="--xla_dump_to=$dump" profile b64 --batch 64
# Every module of the process is dumped: keep the decode program's final HLO (with its buffer
# assignment), few enough files for a device call to return.
mkdir -p "$out/hlo_b64"
cp "$dump"/*stream_decode*after_optimizations* "$out/hlo_b64/" \
  || echo "no stream_decode module in the dump"
profile b64_steps64 --batch 64 --steps 64
# XLA unrolls while loops of small known trip count by default (AUTO_UNROLL); this run keeps
# the 16-step scan rolled.
XLA_FLAGS=--xla_gpu_enable_while_loop_unrolling=WHILE_LOOP_UNROLLING_NO_UNROLL \
  profile b64_no_unroll --batch 64
python3 benchmarks/bench_generate.py --presets gdn2-1.3b --batches 1 64 \
  --variants "" gdn2_decode=unfused --repeats 2 --layer-steps 100 \
  --json "$out/bench_generate.json" || status=1
exit $status
