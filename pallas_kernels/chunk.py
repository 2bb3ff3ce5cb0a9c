"""The Pallas chunk core: the `backend="pallas"` implementation of the op's chunk core.

Same contract as `gdn2_jax.ops.core.xla_chunk_core` (whose XLA code is the executable spec):
q, k, g, b [B, Tp, H, K]; v, w [B, Tp, H, V] with Tp a multiple of 64 (padding tokens are zeros
with g = 0); h0s [N+1, B, H, K, V] float32; segments = (seq, first, last) per chunk. Returns
o [B, Tp, H, V] in q's dtype and finals [N+1, B, H, K, V] float32, differentiable in q, k, v, g, b,
w and h0s through a custom_vjp.

Forward: 2 launches (intra-chunk, state pass). Under differentiation the forward's state pass also
stores each chunk's S₀ and R, so the backward needs no recompute: 3 launches (reverse state pass,
gate-aware WY VJP, intra-chunk VJP). Off a GPU the kernels run in Pallas interpret mode.
"""

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.chunk_bwd import chunk_dstate, chunk_intra_bwd, chunk_wy_bwd
from pallas_kernels.chunk_fwd import chunk_intra, chunk_state
from pallas_kernels.common import check_dims, numerics_for
from pallas_kernels.config import CHUNK, default_chunk_config


def _numerics(q, v, g, chunk_size):
    if chunk_size != CHUNK:
        raise NotImplementedError(f"pallas kernels use chunk_size={CHUNK}, got {chunk_size}")
    check_dims(q.shape[-1], v.shape[-1])
    if any(x.dtype == jnp.float64 for x in (q, v, g)):
        raise NotImplementedError("pallas kernels run in float32/16-bit floats, not float64")
    return numerics_for(q.dtype, interpret=jax.default_backend() != "gpu")


def _cast_inputs(q, k, v, g, b, w):
    """One matmul dtype for every token input (q's), g in float32."""
    dt = q.dtype
    return q, k.astype(dt), v.astype(dt), g.astype(jnp.float32), b.astype(dt), w.astype(dt)


def _forward(q, k, v, g, b, w, h0s, segments, scale, chunk_size, cfg, save):
    num = _numerics(q, v, g, chunk_size)
    cfg = cfg or default_chunk_config(q.dtype)
    q, k, v, g, b, w = _cast_inputs(q, k, v, g, b, w)
    intra = chunk_intra(q, k, v, g, b, w, scale=scale, cfg=cfg, num=num)
    outs = chunk_state(intra, h0s, segments, q.dtype, cfg=cfg, num=num, save=save)
    return intra, outs


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10))
def pallas_chunk_core(q, k, v, g, b, w, h0s, segments, scale, chunk_size, cfg=None):
    """`cfg` None: the tuned launch configuration for q's dtype (`default_chunk_config`)."""
    _, (o, finals) = _forward(q, k, v, g, b, w, h0s, segments, scale, chunk_size, cfg, False)
    return o, finals


def _core_fwd(q, k, v, g, b, w, h0s, segments, scale, chunk_size, cfg):
    intra, (o, finals, s0, r) = _forward(
        q, k, v, g, b, w, h0s, segments, scale, chunk_size, cfg, True
    )
    keep = {n: intra[n] for n in ("G", "gc", "aqk", "ainv", "qg", "kt", "y")}
    return (o, finals), ((q, k, v, g, b, w), h0s, segments, keep, (s0, r))


def _core_bwd(scale, chunk_size, cfg, residuals, cotangents):
    inputs, h0s, segments, intra, saved = residuals
    q, k, v, g, b, w = _cast_inputs(*inputs)
    num = _numerics(q, v, g, chunk_size)
    cfg = cfg or default_chunk_config(q.dtype)
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


def chunk_core(q, k, v, g, b, w, h0s, segments, scale, chunk_size):
    """The op's registration point (`gdn2_jax.ops.core.pallas_chunk_core`)."""
    return pallas_chunk_core(q, k, v, g, b, w, h0s, segments, scale, chunk_size)
