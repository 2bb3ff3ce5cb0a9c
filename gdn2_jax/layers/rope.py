"""Rotary position embedding, GPT-NeoX layout (rotate halves), computed in float32."""

import jax.numpy as jnp


def apply_rope(x, positions, *, theta: float = 10000.0, rotary_dim: int | None = None):
    """x [B, T, H, D], positions [T] or [B, T] -> x with its first `rotary_dim` channels rotated.

    Pair (i, i + r/2) turns by angle position · theta^(−2i/r), as lit_gpt's non-interleaved RoPE.
    """
    D = x.shape[-1]
    r = D if rotary_dim is None else rotary_dim
    inv_freq = 1.0 / theta ** (jnp.arange(0, r, 2, dtype=jnp.float32) / r)
    angle = jnp.einsum("...t,f->...tf", positions.astype(jnp.float32), inv_freq)
    cos, sin = jnp.cos(angle)[..., None, :], jnp.sin(angle)[..., None, :]
    x32 = x.astype(jnp.float32)
    x1, x2, rest = x32[..., : r // 2], x32[..., r // 2 : r], x32[..., r:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
    return out.astype(x.dtype)
