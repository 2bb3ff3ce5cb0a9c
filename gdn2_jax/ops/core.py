"""The chunk cores behind `gated_delta_rule2`, one per named implementation.

A core takes the padded, chunk-aligned layout (see `gdn2_jax.ops.chunk`) and returns
(o in q.dtype, finals [N+1, B, H, K, V] float32). It must be differentiable in q, k, v, g, b, w
and h0s; chunk cores do that with a `jax.custom_vjp` whose backward recomputes per-chunk states.
"""

import functools

import jax

from gdn2_jax.ops.chunk import chunk_forward
from gdn2_jax.ops.chunk_bwd import chunk_backward


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


def pallas_chunk_core(*args, **kwargs):
    """Resolved lazily so that CPU-only installs never import the GPU kernels."""
    try:
        from pallas_kernels import chunk_core
    except ImportError as err:
        raise NotImplementedError(
            f'backend="pallas" needs the pallas_kernels package, which is not available: {err}'
        ) from err
    return chunk_core(*args, **kwargs)


def default_backend():
    """ "pallas" on a GPU, "xla" elsewhere."""
    return "pallas" if jax.default_backend() == "gpu" else "xla"
