"""The implementations behind the op's two forms, each with one contract per form.

Both forms take validated inputs (q, k scaled and normalized as asked, g in float32) and the
initial states stacked as h0s [N+1, B, H, K, V] (`layout.stack_initial_states`), and return
(o, finals [N+1, B, H, K, V] float32):

    chunk form:         run(q, k, v, g, b, w, h0s, cu_seqlens, scale, chunk_size, interpret)
    token-serial form:  run(q, k, v, g, b, w, h0s, cu_seqlens, scale, interpret)

`interpret` only concerns the Pallas kernels (Pallas interpret mode, on any platform). Every
implementation is differentiable in q, k, v, g, b, w and h0s: the chunk cores through a
`jax.custom_vjp` whose backward recomputes per-chunk states, the Pallas token-serial kernel
through the scan reference's VJP.
"""

import functools
import importlib

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from gdn2_jax.ops.chunk import chunk_forward
from gdn2_jax.ops.chunk_bwd import chunk_backward
from gdn2_jax.ops.decay import floor_log_decay
from gdn2_jax.ops.layout import chunk_layout, dense_segments, packed_segments
from gdn2_jax.ops.reference import recurrent

# The name of the chunk cores' backward residuals (the Pallas core's too), for remat policies
# that keep them rather than rerun the op's forward.
OP_RESIDUALS_NAME = "gdn2_op_residuals"


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9))
def xla_chunk_core(q, k, v, g, b, w, h0s, segments, scale, chunk_size):
    """The chunkwise WY algorithm in plain JAX on the padded, chunk-aligned layout."""
    o, finals = chunk_forward(q, k, v, g, b, w, h0s, segments, scale, chunk_size)
    return o.astype(q.dtype), finals


def _xla_fwd(q, k, v, g, b, w, h0s, segments, scale, chunk_size):
    out = xla_chunk_core(q, k, v, g, b, w, h0s, segments, scale, chunk_size)
    return out, checkpoint_name((q, k, v, g, b, w, h0s, segments), OP_RESIDUALS_NAME)


def _xla_bwd(scale, chunk_size, residuals, cotangents):
    q, k, v, g, b, w, h0s, segments = residuals
    do, dfinals = cotangents
    grads = chunk_backward(q, k, v, g, b, w, h0s, segments, scale, chunk_size, do, dfinals)
    primals = (q, k, v, g, b, w, h0s)
    return (*(d.astype(x.dtype) for d, x in zip(grads, primals, strict=True)), None)


xla_chunk_core.defvjp(_xla_fwd, _xla_bwd)


def pallas_kernel(module, name):
    """A kernel of `pallas_kernels`, imported on first use so that the op never needs it."""
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as err:
        raise NotImplementedError(
            f'backend="pallas" needs the pallas_kernels package, which is not available: {err}'
        ) from err


def _on_chunks(padded_core, q, k, v, g, b, w, h0s, cu_seqlens, scale, chunk_size):
    # The chunk cores subtract cumulated log-decays: g = -inf must reach them finite.
    g = floor_log_decay(g)
    padded, segments, unpad = chunk_layout((q, k, v, g, b, w), cu_seqlens, chunk_size)
    o, finals = padded_core(*padded, h0s, segments, scale, chunk_size)
    return unpad(o), finals


def xla_chunk(q, k, v, g, b, w, h0s, cu_seqlens, scale, chunk_size, interpret):
    del interpret  # plain JAX
    return _on_chunks(xla_chunk_core, q, k, v, g, b, w, h0s, cu_seqlens, scale, chunk_size)


def pallas_chunk(q, k, v, g, b, w, h0s, cu_seqlens, scale, chunk_size, interpret):
    core = functools.partial(pallas_kernel("pallas_kernels", "chunk_core"), interpret=interpret)
    return _on_chunks(core, q, k, v, g, b, w, h0s, cu_seqlens, scale, chunk_size)


def scan_recurrent(q, k, v, g, b, w, h0s, cu_seqlens, scale, interpret=False):
    """`gdn2_jax.ops.reference.recurrent` with the segments given as cu_seqlens (None: one
    sequence per batch row)."""
    del interpret  # plain JAX
    T = q.shape[1]
    segments = dense_segments(T) if cu_seqlens is None else packed_segments(cu_seqlens, T)
    return recurrent(q, k, v, g, b, w, h0s, segments, scale)


def scan_chunk(q, k, v, g, b, w, h0s, cu_seqlens, scale, chunk_size, interpret):
    """The chunk form's "scan": the token-serial reference, which has no chunks."""
    del chunk_size
    return scan_recurrent(q, k, v, g, b, w, h0s, cu_seqlens, scale, interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9))
def pallas_recurrent(q, k, v, g, b, w, h0s, cu_seqlens, scale, interpret):
    """`scan_recurrent` on the Pallas token-serial kernel."""
    packed = cu_seqlens is not None
    initial = h0s[:-1, 0] if packed else h0s[0]
    kernel = pallas_kernel("pallas_kernels", "recurrent")
    o, final = kernel(
        q, k, v, g, b, w, initial, scale=scale, cu_seqlens=cu_seqlens, interpret=interpret
    )
    final = final[:, None] if packed else final[None]
    return o, jnp.concatenate([final, jnp.zeros_like(final[:1])], axis=0)


def _pallas_recurrent_fwd(q, k, v, g, b, w, h0s, cu_seqlens, scale, interpret):
    out = pallas_recurrent(q, k, v, g, b, w, h0s, cu_seqlens, scale, interpret)
    return out, (q, k, v, g, b, w, h0s, cu_seqlens)


def _pallas_recurrent_bwd(scale, interpret, residuals, cotangents):
    del interpret
    *primals, cu_seqlens = residuals
    do, dfinals = cotangents
    _, vjp = jax.vjp(lambda *x: scan_recurrent(*x, cu_seqlens, scale), *primals)
    grads = vjp((do.astype(jnp.float32), dfinals))
    return (*(d.astype(x.dtype) for d, x in zip(grads, primals, strict=True)), None)


pallas_recurrent.defvjp(_pallas_recurrent_fwd, _pallas_recurrent_bwd)
