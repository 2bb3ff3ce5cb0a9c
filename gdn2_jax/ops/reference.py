"""Token-serial reference: the recurrence exactly as written, one `jax.lax.scan` step a token.

This defines the semantics every other backend is tested against:

    S_t = (I − k_t (b_t ⊙ k_t)ᵀ) Diag(exp(g_t)) S_{t−1} + k_t (w_t ⊙ v_t)ᵀ
    o_t = S_tᵀ (scale · q_t)
"""

import jax
import jax.numpy as jnp

from gdn2_jax.ops.layout import Segments, accum_dtype


def l2norm(x, eps=1e-6):
    """x / ||x|| over the last axis, in float32 (fla's convention: rsqrt(sum x² + eps))."""
    xf = x.astype(accum_dtype(x))
    return (xf * jax.lax.rsqrt(jnp.sum(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def step_update(q, k, v, g, b, w, S, scale):
    """One token for every (batch, head): q, k, g, b [..., K]; v, w [..., V]; S [..., K, V] f32."""
    q, k, v, g, b, w = (x.astype(accum_dtype(x)) for x in (q, k, v, g, b, w))
    S = S * jnp.exp(g)[..., :, None]
    erase = jnp.einsum("...k,...kv->...v", b * k, S)
    S = S + k[..., :, None] * (w * v - erase)[..., None, :]
    o = jnp.einsum("...k,...kv->...v", q * scale, S)
    return o, S


def recurrent(q, k, v, g, b, w, h0s, segments: Segments, scale):
    """Scans tokens. Inputs [B, T, H, *]; h0s [N+1, B, H, K, V]; segments per token.

    Returns o [B, T, H, V] float32 and finals [N+1, B, H, K, V] float32.
    """
    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, g, b, w))

    def body(carry, inputs):
        S, finals = carry
        (q_t, k_t, v_t, g_t, b_t, w_t), (slot, first, last) = inputs
        S = jnp.where(first, h0s[slot], S)
        o_t, S = step_update(q_t, k_t, v_t, g_t, b_t, w_t, S, scale)
        finals = finals.at[slot].set(jnp.where(last, S, finals[slot]))
        return (S, finals), o_t

    (_, finals), o = jax.lax.scan(body, (h0s[0], jnp.zeros_like(h0s)), (xs, tuple(segments)))
    return jnp.moveaxis(o, 0, 1), finals
