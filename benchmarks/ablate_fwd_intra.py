"""Where the forward intra-chunk kernel spends its time: the kernel timed with one part removed.

    python benchmarks/ablate_fwd_intra.py --shapes 4x4096

Each row replaces one helper of `pallas_kernels.chunk_fwd` by a stand-in of the same shapes that
does (almost) no work, retraces the kernel and times it; the drop against the full kernel is
that part's cost. The outputs of ablated runs are meaningless; only the times are read. A
profiling aid for kernel work, not a correctness tool.
"""

import argparse
import contextlib
import os
from unittest import mock

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
from bench_kernels import op_inputs, stage_fns, time_stage
from bench_ops import Case

from pallas_kernels import chunk_fwd, default_chunk_config
from pallas_kernels.config import NUM_SUB, SUB


def _zero_pair(*args, **kwargs):
    del args, kwargs
    zero = jnp.zeros((SUB, SUB), jnp.float32)
    return zero, zero


def _zero_offdiag(*args, **kwargs):
    del args, kwargs
    zero = jnp.zeros((SUB, SUB), jnp.float32)
    blocks = {p: zero for p in chunk_fwd._PAIRS}
    return blocks, dict(blocks)


def _solve_identity(t, precision):
    """Keeps T's blocks (so the scores stay live) and skips every substitution and product."""
    del precision
    eye = jnp.eye(SUB, dtype=jnp.float32)
    return {(i, j): (eye if i == j else t[(i, j)]) for i in range(NUM_SUB) for j in range(i + 1)}


def _solve_at_tf32(t, precision):
    del precision
    return ORIGINAL_SOLVE(t, jax.lax.Precision.DEFAULT)


def _invert_skip(t):
    return jnp.eye(SUB, dtype=jnp.float32) - t


def _aux_noop(*args, **kwargs):
    del args, kwargs


ORIGINAL_SOLVE = chunk_fwd._solve_blocks
ABLATIONS = {
    "full kernel": {},
    "no diagonal scores": {"_diag_scores": _zero_pair},
    "no off-diagonal scores": {"_offdiag_scores": _zero_offdiag},
    "no solve (T kept)": {"_solve_blocks": _solve_identity},
    "solve at TF32": {"_solve_blocks": _solve_at_tf32},
    "no 16x16 substitution": {"_invert_unit_lower": _invert_skip},
    "no auxiliaries (U,Y,Q,K)": {"_aux": _aux_noop},
    "scores only": {"_solve_blocks": _solve_identity, "_aux": _aux_noop},
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["4x4096"])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    for shape in args.shapes:
        case = Case(*map(int, shape.split("x")), dtype=args.dtype)
        it = op_inputs(case)
        cfg = default_chunk_config(jnp.dtype(case.dtype))
        print(f"{case.label}, fwd intra kernel", flush=True)
        base = None
        for label, patches in ABLATIONS.items():
            with contextlib.ExitStack() as stack:
                for name, stand_in in patches.items():
                    stack.enter_context(mock.patch.object(chunk_fwd, name, stand_in))
                fn = stage_fns(case, cfg)["fwd intra"]
                ms = time_stage(fn, it, args.iters)
            base = ms if base is None else base
            print(f"  {label:<26} {ms:8.3f} ms  ({ms - base:+.3f})", flush=True)


if __name__ == "__main__":
    main()
