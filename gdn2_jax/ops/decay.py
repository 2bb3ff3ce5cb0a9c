"""Decay-weighted scores inside a chunk without ever forming exp(−G).

The chunk algorithm needs X_ij = Σ_d a_id c_jd exp(G_id − G_jd) for j ≤ i (or j < i), with G the
within-chunk cumulative log-decay (non-increasing, since g ≤ 0). The paper writes this as a
product of γ ⊙ a and γ⁻¹ ⊙ c, but γ⁻¹ = exp(−G) overflows float32 once a chunk has decayed past
≈ −88 (a 64-token chunk with g ≈ −5 reaches −320). Instead the chunk is cut into sub-blocks:

* off-diagonal sub-blocks are factored through a boundary point m (the last position before the
  row block): exp(G_i − G_m) · exp(G_m − G_j), and both exponents are ≤ 0 because j ≤ m ≤ i;
* diagonal sub-blocks are formed pairwise, with the causal mask applied before exp.

Every exponential therefore has a non-positive argument: exact for any finite g ≤ 0, hard resets
(g = −80) included, with no clipping. g = −inf (a hard reset as the recurrence defines it,
exp(−inf) = 0) would make G_i − G_j = −inf − (−inf) = NaN, so the chunk forms first raise g to
`log_decay_floor`, where exp is already exactly 0: no decay factor changes.
"""

import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST


def log_decay_floor(dtype):
    """A log-decay below which exp is exactly 0 in `dtype` (float32: −111.3): 8 under the log of
    the smallest subnormal, so that exp underflows to 0 with or without subnormals."""
    return float(np.log(np.finfo(dtype).smallest_subnormal)) - 8.0


def floor_log_decay(g):
    """g with every value under `log_decay_floor` (−inf included) raised to it; the gradient of
    those values is 0, as the recurrence's exp(g) gives at g = −inf."""
    floor = log_decay_floor(g.dtype)
    return jnp.where(g < floor, jnp.asarray(floor, g.dtype), g)


def _masked_exp(x, mask):
    """exp(x) where mask, else 0; the mask is applied before exp so masked lanes never overflow."""
    return jnp.where(mask, jnp.exp(jnp.where(mask, x, 0.0)), 0.0)


def decay_scores(a, c, G, *, strict, sub_block=16):
    """X[..., i, j] = Σ_d a[i,d] c[j,d] exp(G[i,d] − G[j,d]) on j < i (strict) or j ≤ i.

    a, c, G: [..., C, K] float32 with C a multiple of sub_block. Returns [..., C, C] float32.
    """
    *lead, C, K = a.shape
    s = min(sub_block, C)
    n = C // s
    pos = jnp.arange(C)

    # Off-diagonal: row block I uses boundary m_I = I·s − 1 and sees columns j ≤ m_I only.
    boundary = jnp.maximum(jnp.arange(n) * s - 1, 0)  # [n]; block 0 sees no columns
    G_m = G[..., boundary, :]  # [..., n, K]
    a_blocks = a.reshape(*lead, n, s, K)
    G_blocks = G.reshape(*lead, n, s, K)
    rows = a_blocks * jnp.exp(G_blocks - G_m[..., :, None, :])  # [..., n, s, K]
    col_mask = pos[None, :] < (jnp.arange(n) * s)[:, None]  # [n, C]
    cols = c[..., None, :, :] * _masked_exp(
        G_m[..., :, None, :] - G[..., None, :, :], col_mask[:, :, None]
    )  # [..., n, C, K]
    off = jnp.einsum("...nik,...njk->...nij", rows, cols, precision=HIGHEST)  # [..., n, s, C]

    # Diagonal: pairwise exp(G_i − G_j) inside each s×s block.
    c_blocks = c.reshape(*lead, n, s, K)
    local = jnp.arange(s)
    causal = local[:, None] > local[None, :] if strict else local[:, None] >= local[None, :]
    pair_decay = _masked_exp(
        G_blocks[..., :, :, None, :] - G_blocks[..., :, None, :, :], causal[:, :, None]
    )  # [..., n, s, s, K]
    diag = jnp.einsum(
        "...nik,...njk,...nijk->...nij", a_blocks, c_blocks, pair_decay, precision=HIGHEST
    )
    # Place each diagonal block at its column offset: [..., n, s, n, s] with an identity on blocks.
    diag = diag[..., :, :, None, :] * jnp.eye(n, dtype=diag.dtype)[:, None, :, None]
    return (off + diag.reshape(*lead, n, s, C)).reshape(*lead, C, C)
