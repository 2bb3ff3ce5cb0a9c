"""Chunkwise WY algorithm (paper App. A) and its gate-aware backward (App. B) in plain JAX.

Works on the padded, chunk-aligned layout produced by `gdn2_jax.ops.api`:
q, k, g, b [B, Tp, H, K]; v, w [B, Tp, H, V]; Tp a multiple of the chunk size. Padding tokens are
zeros with g = 0, which leaves the state untouched. `chunk_core` is a `jax.custom_vjp`; the Pallas
kernels implement the same core. Within one chunk (rows r, s; per head):

    G = cumsum(g)        γ = exp(G)        Q_γ = scale·q ⊙ γ        K_tail = k ⊙ γ_C / γ
    Ē = γ ⊙ b ⊙ k        Z = w ⊙ v         T = tril(Ē K̄ᵀ, −1)      A_qk = tril(scale·Q_γ K̄ᵀ)
    [U | Y] = (I + T)⁻¹ [Z | Ē]            R = U − Y S₀
    O = Q_γ S₀ + A_qk R                     S_C = Diag(γ_C) S₀ + K_tailᵀ R

T and A_qk come from `decay_scores`, which never forms K̄ = γ⁻¹ ⊙ k.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from gdn2_jax.ops.decay import HIGHEST, decay_scores
from gdn2_jax.ops.layout import Segments, accum_dtype


class ChunkLocal(NamedTuple):
    """Everything a chunk computes without the carried state; all [B, NT, H, C, *] float32."""

    gamma: jax.Array  # γ = exp(G)
    gamma_last: jax.Array  # γ_C, [B, NT, H, K]
    q_gamma: jax.Array  # scale·q ⊙ γ
    k_tail: jax.Array  # k ⊙ γ_C / γ
    A_qk: jax.Array  # [.., C, C] causal decayed scores (inclusive)
    T: jax.Array  # [.., C, C] strictly lower decayed erase scores
    U: jax.Array  # (I + T)⁻¹ Z
    Y: jax.Array  # (I + T)⁻¹ Ē


def _mm(spec, *xs):
    return jnp.einsum(spec, *xs, precision=HIGHEST)


def to_chunks(x, chunk_size):
    """[B, Tp, H, D] -> [B, NT, H, C, D] float32."""
    B, Tp, H, D = x.shape
    x = x.astype(accum_dtype(x)).reshape(B, Tp // chunk_size, chunk_size, H, D)
    return x.transpose(0, 1, 3, 2, 4)


def from_chunks(x):
    """[B, NT, H, C, D] -> [B, Tp, H, D]."""
    B, NT, H, C, D = x.shape
    return x.transpose(0, 1, 3, 2, 4).reshape(B, NT * C, H, D)


def unit_lower_inverse(T):
    """(I + T)⁻¹ for strictly lower triangular T [..., C, C], C a power of two.

    Exact block substitution, doubling the block size from 1×1:
    [[A, 0], [L, D]]⁻¹ = [[A⁻¹, 0], [−D⁻¹ L A⁻¹, D⁻¹]]. A power series would overflow when keys
    in a chunk are nearly parallel; substitution is exact whatever the conditioning. Batched
    matmuls rather than `lax.linalg.triangular_solve`, which XLA:CPU runs ~100x slower.
    """
    *lead, C, _ = T.shape
    inv = jnp.ones((*lead, C, 1, 1), T.dtype)  # the diagonal blocks' inverses, size s = 1
    s = 1
    while s < C:
        n = C // (2 * s)
        blocks = T.reshape(*lead, n, 2 * s, n, 2 * s)
        lower_left = jnp.einsum("...aiaj->...aij", blocks)[..., s:, :s]  # [..., n, s, s]
        a_inv, d_inv = inv[..., 0::2, :, :], inv[..., 1::2, :, :]
        x = -_mm("...ij,...jk->...ik", d_inv, _mm("...ij,...jk->...ik", lower_left, a_inv))
        top = jnp.concatenate([a_inv, jnp.zeros_like(a_inv)], axis=-1)
        inv = jnp.concatenate([top, jnp.concatenate([x, d_inv], axis=-1)], axis=-2)
        s *= 2
    return inv[..., 0, :, :]


def solve_unit_lower(T, rhs, *, transpose=False):
    """(I + T)⁻¹ rhs (or (I + T)⁻ᵀ rhs); T strictly lower triangular."""
    spec = "...ji,...jk->...ik" if transpose else "...ij,...jk->...ik"
    return _mm(spec, unit_lower_inverse(T), rhs)


def chunk_local(q, k, v, g, b, w, scale):
    """The state-independent part of every chunk, all chunks at once."""
    G = jnp.cumsum(g, axis=-2)
    gamma = jnp.exp(G)
    G_last = G[..., -1:, :]
    E = gamma * b * k
    T = decay_scores(b * k, k, G, strict=True)
    UY = solve_unit_lower(T, jnp.concatenate([w * v, E], axis=-1))
    V = v.shape[-1]
    return ChunkLocal(
        gamma=gamma,
        gamma_last=jnp.exp(G_last[..., 0, :]),
        q_gamma=scale * q * gamma,
        k_tail=k * jnp.exp(G_last - G),
        A_qk=decay_scores(scale * q, k, G, strict=False),
        T=T,
        U=UY[..., :V],
        Y=UY[..., V:],
    )


def _chunk_major(x):
    return jnp.moveaxis(x, 1, 0)


def state_pass(loc: ChunkLocal, h0s, segments: Segments):
    """Carries the state across chunks. Returns S_in, R as [B, NT, H, ...] and finals."""

    def body(carry, xs):
        S, finals = carry
        U, Y, k_tail, gamma_last, slot, first, last = xs
        S = jnp.where(first, h0s[slot], S)
        R = U - _mm("bhck,bhkv->bhcv", Y, S)
        S_next = gamma_last[..., :, None] * S + _mm("bhck,bhcv->bhkv", k_tail, R)
        finals = finals.at[slot].set(jnp.where(last, S_next, finals[slot]))
        return (S_next, finals), (S, R)

    xs = tuple(map(_chunk_major, (loc.U, loc.Y, loc.k_tail, loc.gamma_last)))
    (_, finals), (S_in, R) = jax.lax.scan(body, (h0s[0], jnp.zeros_like(h0s)), (*xs, *segments))
    return _chunk_major(S_in), _chunk_major(R), finals


def chunk_forward(q, k, v, g, b, w, h0s, segments, scale, chunk_size):
    """o [B, Tp, H, V] float32 and finals [N+1, B, H, K, V]."""
    q, k, v, g, b, w = (to_chunks(x, chunk_size) for x in (q, k, v, g, b, w))
    loc = chunk_local(q, k, v, g, b, w, scale)
    # XLA:CPU in jaxlib 0.11.2 sometimes miscompiles a matmul against the constant zero state
    # (garbage in about half of fresh compiles for T <= 64 without initial_state); hiding the
    # constant from the simplifier keeps that matmul a plain one.
    h0s = jax.lax.optimization_barrier(h0s)
    S_in, R, finals = state_pass(loc, h0s, segments)
    o = _mm("bnhck,bnhkv->bnhcv", loc.q_gamma, S_in) + _mm("bnhij,bnhjv->bnhiv", loc.A_qk, R)
    return from_chunks(o), finals
