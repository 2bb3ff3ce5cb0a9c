"""The Pallas chunk core: the `backend="pallas"` implementation of the op's chunk core.

Same contract as `gdn2_jax.ops.core.xla_chunk_core` (whose XLA code is the executable spec):
q, k, g, b [B, Tp, H, K]; v, w [B, Tp, H, V] with Tp a multiple of 64 (padding tokens are zeros
with g = 0) and g finite (the op raises g = −inf to `gdn2_jax.ops.decay.log_decay_floor`, where
exp is exactly 0, since the kernels subtract cumulated decays and −inf − (−inf) is NaN);
h0s [N+1, B, H, K, V] float32; segments = (seq, first, last) per chunk. Returns o [B, Tp, H, V] in
q's dtype and finals [N+1, B, H, K, V] float32, differentiable in q, k, v, g, b, w and h0s through
a custom_vjp. `interpret=True` runs every kernel in Pallas interpret mode.

Forward (`ChunkConfig.structure`): "fused" is 3 launches (diagonal blocks, intra-chunk, state pass
with the output), "split" 5 (diagonal blocks, solve, WY apply, state pass, output; see
`chunk_fwd_split`), "split_prep" / "split_output" one of the two splits. Under differentiation
the forward also stores each chunk's S₀ and R, so the backward needs no recompute: 4 launches
(reverse state pass, gate-aware WY VJP, the intra-chunk VJP's diagonal blocks and the rest).
"""

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from pallas_kernels.chunk_bwd import chunk_dstate, chunk_intra_bwd, chunk_wy_bwd
from pallas_kernels.chunk_fwd import chunk_intra, chunk_state
from pallas_kernels.chunk_fwd_split import chunk_intra_split, chunk_state_split
from pallas_kernels.common import dims_unsupported, dtypes_unsupported, numerics_for
from pallas_kernels.config import CHUNK, default_chunk_config
from pallas_kernels.state_mosaic import chunk_state_mosaic

# The name of the backward's residuals, for remat policies that keep them rather than rerun the
# forward kernels: gdn2_jax.ops.core.OP_RESIDUALS_NAME, which names the XLA core's the same way.
RESIDUALS_NAME = "gdn2_op_residuals"


def chunk_unsupported(K, V, dtypes, chunk_size):
    """Why the chunk kernels cannot run these inputs (None when they can): the op's registry
    asks this before choosing backend="pallas"."""
    if chunk_size != CHUNK:
        return f"pallas kernels use chunk_size={CHUNK}, got {chunk_size}"
    return dims_unsupported(K, V) or dtypes_unsupported(dtypes)


def _numerics(q, v, g, chunk_size, cfg, interpret):
    reason = chunk_unsupported(q.shape[-1], v.shape[-1], (q.dtype, v.dtype, g.dtype), chunk_size)
    if reason is not None:
        raise NotImplementedError(reason)
    cfg = cfg or default_chunk_config(q.dtype)
    cfg.check_dims(q.shape[-1], v.shape[-1])
    return numerics_for(q.dtype, interpret=interpret, solve=cfg.solve), cfg


# ChunkConfig.structure -> (the state-independent launches, the state pass and output).
FORWARDS = {
    "fused": (chunk_intra, chunk_state),
    "split_prep": (chunk_intra_split, chunk_state),
    "split_output": (chunk_intra, chunk_state_split),
    "split": (chunk_intra_split, chunk_state_split),
}


def _cast_inputs(q, k, v, g, b, w):
    """One matmul dtype for every token input (q's), g in float32."""
    dt = q.dtype
    return q, k.astype(dt), v.astype(dt), g.astype(jnp.float32), b.astype(dt), w.astype(dt)


def _forward(q, k, v, g, b, w, h0s, segments, scale, chunk_size, cfg, interpret, save):
    num, cfg = _numerics(q, v, g, chunk_size, cfg, interpret)
    q, k, v, g, b, w = _cast_inputs(q, k, v, g, b, w)
    prep, state = FORWARDS[cfg.structure]
    if cfg.state_lowering == "mosaic":
        state = chunk_state_mosaic
    intra = prep(q, k, v, g, b, w, scale=scale, cfg=cfg, num=num)
    outs = state(intra, h0s, segments, q.dtype, cfg=cfg, num=num, save=save)
    return intra, outs


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11))
def pallas_chunk_core(
    q, k, v, g, b, w, h0s, segments, scale, chunk_size, cfg=None, interpret=False
):
    """`cfg` None: the tuned launch configuration for q's dtype (`default_chunk_config`)."""
    args = (q, k, v, g, b, w, h0s, segments, scale, chunk_size, cfg, interpret)
    _, (o, finals) = _forward(*args, save=False)
    return o, finals


def _core_fwd(q, k, v, g, b, w, h0s, segments, scale, chunk_size, cfg, interpret):
    args = (q, k, v, g, b, w, h0s, segments, scale, chunk_size, cfg, interpret)
    intra, (o, finals, s0, r) = _forward(*args, save=True)
    keep = {n: intra[n] for n in ("G", "gc", "aqk", "ainv", "qg", "kt", "y")}
    residuals = ((q, k, v, g, b, w), h0s, segments, keep, (s0, r))
    return (o, finals), checkpoint_name(residuals, RESIDUALS_NAME)


def _core_bwd(scale, chunk_size, cfg, interpret, residuals, cotangents):
    inputs, h0s, segments, intra, saved = residuals
    q, k, v, g, b, w = _cast_inputs(*inputs)
    num, cfg = _numerics(q, v, g, chunk_size, cfg, interpret)
    do, dfinals = cotangents
    dsc, dr, dh0s = chunk_dstate(
        intra, saved[0].shape, segments, do.astype(q.dtype), dfinals, cfg=cfg, num=num
    )
    dv, dw, *wy = chunk_wy_bwd(
        q, k, v, b, w, do.astype(q.dtype), intra, saved, (dsc, dr), scale=scale, cfg=cfg, num=num
    )
    dq, dk, db, dg = chunk_intra_bwd(q, k, b, intra["G"], wy, scale=scale, cfg=cfg, num=num)
    grads = (dq, dk, dv, dg, db, dw, dh0s)
    return (*(d.astype(x.dtype) for d, x in zip(grads, (*inputs, h0s), strict=True)), None)


pallas_chunk_core.defvjp(_core_fwd, _core_bwd)


def chunk_core(q, k, v, g, b, w, h0s, segments, scale, chunk_size, *, interpret, cfg=None):
    """The op's registration point (`gdn2_jax.ops.core.pallas_chunk`): the tuned defaults, or
    `cfg` where a test or benchmark binds another ChunkConfig."""
    return pallas_chunk_core(q, k, v, g, b, w, h0s, segments, scale, chunk_size, cfg, interpret)
