"""The chunk cores behind `gated_delta_rule2`, one per named implementation.

A core takes the padded, chunk-aligned layout (see `gdn2_jax.ops.chunk`) and returns
(o in q.dtype, finals [N+1, B, H, K, V] float32). It must be differentiable in q, k, v, g, b, w
and h0s; chunk cores do that with a `jax.custom_vjp` whose backward recomputes per-chunk states.

`pallas_recurrent` is the token-serial counterpart for decoding and short prefills: the Pallas
kernel forward, the scan reference's VJP backward.
"""

import functools
import importlib

import jax
import jax.numpy as jnp

from gdn2_jax.ops.chunk import chunk_forward
from gdn2_jax.ops.chunk_bwd import chunk_backward
from gdn2_jax.ops.layout import dense_segments, packed_segments
from gdn2_jax.ops.reference import recurrent


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9))
def xla_chunk_core(q, k, v, g, b, w, h0s, segments, scale, chunk_size):
    o, finals = chunk_forward(q, k, v, g, b, w, h0s, segments, scale, chunk_size)
    return o.astype(q.dtype), finals


def _xla_fwd(q, k, v, g, b, w, h0s, segments, scale, chunk_size):
    out = xla_chunk_core(q, k, v, g, b, w, h0s, segments, scale, chunk_size)
    return out, (q, k, v, g, b, w, h0s, segments)


def _xla_bwd(scale, chunk_size, residuals, cotangents):
    q, k, v, g, b, w, h0s, segments = residuals
    do, dfinals = cotangents
    grads = chunk_backward(q, k, v, g, b, w, h0s, segments, scale, chunk_size, do, dfinals)
    primals = (q, k, v, g, b, w, h0s)
    return (*(d.astype(x.dtype) for d, x in zip(grads, primals, strict=True)), None)


xla_chunk_core.defvjp(_xla_fwd, _xla_bwd)


def _pallas_kernel(module, name):
    """A kernel of `pallas_kernels`, imported on first use so that CPU-only installs never
    import the GPU kernels."""
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as err:
        raise NotImplementedError(
            f'backend="pallas" needs the pallas_kernels package, which is not available: {err}'
        ) from err


def pallas_chunk_core(*args, **kwargs):
    return _pallas_kernel("pallas_kernels", "chunk_core")(*args, **kwargs)


def scan_recurrent(q, k, v, g, b, w, h0s, cu_seqlens, scale):
    """`gdn2_jax.ops.reference.recurrent` with the segments given as cu_seqlens (None: one
    sequence per batch row); the contract `pallas_recurrent` shares."""
    T = q.shape[1]
    segments = dense_segments(T) if cu_seqlens is None else packed_segments(cu_seqlens, T)
    return recurrent(q, k, v, g, b, w, h0s, segments, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def pallas_recurrent(q, k, v, g, b, w, h0s, cu_seqlens, scale):
    """`scan_recurrent` on the Pallas token-serial kernel: h0s and finals [N+1, B, H, K, V]."""
    packed = cu_seqlens is not None
    initial = h0s[:-1, 0] if packed else h0s[0]
    o, final = _pallas_kernel("pallas_kernels.recurrent", "recurrent")(
        q, k, v, g, b, w, initial, scale=scale, cu_seqlens=cu_seqlens
    )  # fmt: skip
    final = final[:, None] if packed else final[None]
    return o, jnp.concatenate([final, jnp.zeros_like(final[:1])], axis=0)


def _pallas_recurrent_fwd(q, k, v, g, b, w, h0s, cu_seqlens, scale):
    out = pallas_recurrent(q, k, v, g, b, w, h0s, cu_seqlens, scale)
    return out, (q, k, v, g, b, w, h0s, cu_seqlens)


def _pallas_recurrent_bwd(scale, residuals, cotangents):
    *primals, cu_seqlens = residuals
    do, dfinals = cotangents
    _, vjp = jax.vjp(
        lambda *x: scan_recurrent(*x, cu_seqlens, scale), *primals
    )  # fmt: skip
    grads = vjp((do.astype(jnp.float32), dfinals))
    return (*(d.astype(x.dtype) for d, x in zip(grads, primals, strict=True)), None)


pallas_recurrent.defvjp(_pallas_recurrent_fwd, _pallas_recurrent_bwd)


def default_backend():
    """ "pallas" on a GPU, "xla" elsewhere."""
    return "pallas" if jax.default_backend() == "gpu" else "xla"
