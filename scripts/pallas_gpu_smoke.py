"""Compile and check every Pallas kernel on the GPU against the XLA path, a line per kernel and
configuration: python scripts/pallas_gpu_smoke.py (stops at the first lowering failure);
python scripts/pallas_gpu_smoke.py --split: only the split forward's rows.

The core rows compare against the XLA chunk core in float32 on the same inputs (extreme gates,
an initial state); the `solve=` rows are the same check under each precision of the triangular
solve (`ChunkConfig.solve`), which is how its default was chosen; the `structure=split` rows
under the split forward, with each diagonal inverse and solve precision."""

import argparse
import dataclasses
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
import numpy as np

from gdn2_jax.crosscheck import NAMES, Shape, make_inputs, rel_err
from gdn2_jax.ops import gated_delta_rule2_recurrent
from gdn2_jax.ops.core import xla_chunk_core
from gdn2_jax.ops.layout import dense_segments
from pallas_kernels import default_chunk_config
from pallas_kernels.chunk import pallas_chunk_core
from pallas_kernels.config import DIAG_INVERSES, SOLVE_CHOICES
from pallas_kernels.recurrent import recurrent


def check(label, fn):
    print(f"{label:<40} {fn()}", flush=True)


def core_errors(dtype, K, V, T=256, B=2, H=2, **fields):
    """`fields`: ChunkConfig fields that differ from the tuned defaults for `dtype`."""
    x = make_inputs(0, Shape(B=B, T=T, H=H, K=K, V=V), extreme=True)
    args = [jnp.asarray(x[n], jnp.float32 if n == "g" else dtype) for n in NAMES[:6]]
    h0s = jnp.stack([jnp.asarray(x["initial_state"]), jnp.zeros_like(x["initial_state"])])
    seg = dense_segments(T // 64)
    rng = np.random.default_rng(1)
    do = rng.standard_normal((B, T, H, V))
    dfin = jnp.asarray(rng.standard_normal(h0s.shape), jnp.float32)

    def run(core, a):
        out, vjp = jax.vjp(lambda *z: core(*z, seg, K**-0.5, 64), *a)
        grads = vjp((jnp.asarray(do, a[0].dtype), dfin))
        # finals and dh0s: only slot 0 is a sequence's (slot 1 is the unused zero slot).
        return [np.asarray(x, np.float32) for x in (out[0], out[1][0], *grads[:6], grads[6][0])]

    cfg = dataclasses.replace(default_chunk_config(dtype), **fields)

    def pallas(*z):
        return pallas_chunk_core(*z, cfg, False)

    ours = run(pallas, [*args, h0s])
    ref = run(xla_chunk_core, [*[a.astype(jnp.float32) for a in args], h0s])
    names = ["o", "fin", *"qkvgbw", "h0"]
    return " ".join(f"{n}={rel_err(a, b):.1e}" for n, a, b in zip(names, ours, ref, strict=True))


def recurrent_error(dtype):
    x = make_inputs(1, Shape(B=2, T=33, H=2, K=128, V=128))
    args = [jnp.asarray(x[n], jnp.float32 if n == "g" else dtype) for n in NAMES[:6]]
    o, S = recurrent(*args, jnp.asarray(x["initial_state"]))
    o_ref, S_ref = gated_delta_rule2_recurrent(
        *[a.astype(jnp.float32) for a in args],
        initial_state=jnp.asarray(x["initial_state"]),
        output_final_state=True,
    )
    return f"o={rel_err(o.astype(jnp.float32), o_ref):.1e} S={rel_err(S, S_ref):.1e}"


def split_rows():
    """bf16 and float32 under the split forward with both diagonal inverses; float32 with the
    doubling inverse also at each solve precision (its error against the float32 reference)."""
    for dtype in (jnp.bfloat16, jnp.float32):
        for inverse in DIAG_INVERSES:
            precise = inverse == "doubling" and dtype == jnp.float32
            for solve in SOLVE_CHOICES if precise else SOLVE_CHOICES[:1]:
                fields = dict(structure="split", diag_inverse=inverse, solve=solve)
                label = " ".join(f"{k}={v}" for k, v in fields.items())
                check(
                    f"core {jnp.dtype(dtype).name} K128 V128 {label}",
                    lambda d=dtype, f=fields: core_errors(
                        d, 128, 128, diag_store="columns", diag_loop_block_k=None, **f
                    ),
                )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", action="store_true", help="only the split forward's rows")
    print(jax.devices())
    if parser.parse_args().split:
        split_rows()
        return
    for dtype in (jnp.float32, jnp.bfloat16):
        check(f"recurrent {jnp.dtype(dtype).name}", lambda d=dtype: recurrent_error(d))
    for dtype in (jnp.bfloat16, jnp.float32):
        for K, V in ((128, 128), (64, 64), (32, 16), (256, 256), (256, 64)):
            check(
                f"core {jnp.dtype(dtype).name} K{K} V{V}",
                lambda d=dtype, k=K, v=V: core_errors(d, k, v),
            )
        for solve in SOLVE_CHOICES[1:]:
            check(
                f"core {jnp.dtype(dtype).name} K128 V128 solve={solve}",
                lambda d=dtype, s=solve: core_errors(d, 128, 128, solve=s),
            )


if __name__ == "__main__":
    main()
