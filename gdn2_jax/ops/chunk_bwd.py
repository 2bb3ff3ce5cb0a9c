"""Gate-aware backward of the chunkwise algorithm (paper App. B), in plain JAX.

The per-chunk states are recomputed from the inputs (one forward state pass) instead of being
stored, so the residuals are the inputs themselves: O(T·(K+V)) activations plus O(T/C·K·V) states
alive during the backward.
"""

import jax
import jax.numpy as jnp

from gdn2_jax.ops.chunk import (
    ChunkLocal,
    _chunk_major,
    _mm,
    chunk_local,
    from_chunks,
    solve_unit_lower,
    state_pass,
    to_chunks,
)
from gdn2_jax.ops.decay import decay_scores
from gdn2_jax.ops.layout import Segments


def reverse_state_pass(loc: ChunkLocal, dO, dfinals, segments: Segments):
    """Carries dS backwards across chunks (Eqs. 54–63 that involve the state).

    Returns dR and dS_out (the gradient of each chunk's end state), [B, NT, H, ...], and dh0s.
    """
    dR_from_o = _mm("bnhij,bnhiv->bnhjv", loc.A_qk, dO)  # A_qkᵀ dO
    dS_from_o = _mm("bnhck,bnhcv->bnhkv", loc.q_gamma, dO)  # Q_γᵀ dO

    def body(carry, xs):
        dS, dh0s = carry
        dR_o, dS_o, k_tail, Y, gamma_last, slot, first, last = xs
        dS_out = dS + jnp.where(last, dfinals[slot], 0.0)
        dR = dR_o + _mm("bhck,bhkv->bhcv", k_tail, dS_out)
        dS_in = dS_o + gamma_last[..., :, None] * dS_out - _mm("bhck,bhcv->bhkv", Y, dR)
        dh0s = dh0s.at[slot].add(jnp.where(first, dS_in, 0.0))
        # A reset cuts the chain: the previous chunk's end state feeds nothing here.
        return (jnp.where(first, 0.0, dS_in), dh0s), (dR, dS_out)

    xs = tuple(map(_chunk_major, (dR_from_o, dS_from_o, loc.k_tail, loc.Y, loc.gamma_last)))
    init = (jnp.zeros_like(dfinals[0]), jnp.zeros_like(dfinals))
    (_, dh0s), (dR, dS_out) = jax.lax.scan(body, init, (*xs, *segments), reverse=True)
    return _chunk_major(dR), _chunk_major(dS_out), dh0s


def _decay_scores_vjp(a, c, G, d_scores, strict):
    _, vjp = jax.vjp(lambda a, c, G: decay_scores(a, c, G, strict=strict), a, c, G)
    return vjp(d_scores)


def chunk_backward(q, k, v, g, b, w, h0s, segments, scale, chunk_size, do, dfinals):
    """Cotangents of (q, k, v, g, b, w, h0s) in float32; inputs on the padded layout."""
    q, k, v, g, b, w, dO = (to_chunks(x, chunk_size) for x in (q, k, v, g, b, w, do))
    loc = chunk_local(q, k, v, g, b, w, scale)
    S_in, R, _ = state_pass(loc, h0s, segments)
    dR, dS_out, dh0s = reverse_state_pass(loc, dO, dfinals.astype(h0s.dtype), segments)

    # Output path (Eqs. 53, 55) and the end-state path (Eqs. 58, 60); A_qk's and T's causal masks
    # need no explicit application: decay_scores' VJP drops the entries it never produces.
    dA_qk = _mm("bnhiv,bnhjv->bnhij", dO, R)
    dq_gamma = _mm("bnhcv,bnhkv->bnhck", dO, S_in)
    dk_tail = _mm("bnhcv,bnhkv->bnhck", R, dS_out)
    dG_last = jnp.sum(dk_tail * loc.k_tail, axis=-2) + loc.gamma_last * jnp.sum(
        dS_out * S_in, axis=-1
    )

    # R = U − Y S₀ (Eqs. 61–62), then the gate-aware WY VJP (Eqs. 64–66): the gates sit inside
    # Z = w ⊙ v and Ē = γ ⊙ b ⊙ k, which multiply the solve's cotangent as whole rows.
    dY = -_mm("bnhcv,bnhkv->bnhck", dR, S_in)
    dZE = solve_unit_lower(loc.T, jnp.concatenate([dR, dY], axis=-1), transpose=True)
    V = v.shape[-1]
    dZ, dE = dZE[..., :V], dZE[..., V:]
    dT = -_mm("bnhie,bnhje->bnhij", dZE, jnp.concatenate([loc.U, loc.Y], axis=-1))

    G = jnp.cumsum(g, axis=-2)
    d_bk, dk_T, dG_T = _decay_scores_vjp(b * k, k, G, dT, strict=True)
    d_qs, dk_A, dG_A = _decay_scores_vjp(scale * q, k, G, dA_qk, strict=False)

    gamma = loc.gamma
    E = gamma * b * k
    dq = scale * (dq_gamma * gamma + d_qs)
    dk = (dE * gamma + d_bk) * b + dk_T + dk_A + dk_tail * jnp.exp(G[..., -1:, :] - G)
    db = (dE * gamma + d_bk) * k
    dG = dq_gamma * loc.q_gamma + dE * E - dk_tail * loc.k_tail + dG_T + dG_A
    dG = dG.at[..., -1, :].add(dG_last)
    dg = jnp.flip(jnp.cumsum(jnp.flip(dG, axis=-2), axis=-2), axis=-2)  # Eq. 82
    grads = (dq, dk, dZ * w, dg, db, dZ * v)
    return (*(from_chunks(x) for x in grads), dh0s)
