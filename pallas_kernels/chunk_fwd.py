"""Forward kernels of the chunkwise WY algorithm (paper App. A, C.2).

`chunk_intra` builds everything that does not depend on the carried state, in three steps: the
within-chunk cumulative log-decay G = cumsum(g) (XLA, float32); the diagonal 16×16 blocks of A_qk
and T, whose pairwise decays are exact only column by column, token-parallel (one program per
16-row sub-block, so their register-hungry loop does not share a program with the rest; a
[16, 16, bk] pairwise tile instead of the loop measured slower, 1.20 against 0.82 ms); then one
program per (chunk, batch·head) for the off-diagonal blocks with the safe decay factorization,
(I + T)⁻¹ by 16×16 blocks, U, Y, Q_γ and K_tail. `chunk_state`: one program per (V block,
batch·head) walks the chunks in order with the state tile S [K, BV] resident in registers and
emits O = Q_γ S + A_qk R and the final states; its residual-saving variant also stores each
chunk's S₀ and R for the backward.

Layouts: token arrays are [B, Tp, H, D] (the op's); per-head intermediates are [B·H, Tp, D] so that
each chunk's tile is contiguous.
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.common import (
    F32,
    ZEROS_INPUT,
    Numerics,
    barrier,
    compiler_params,
    iota,
    mm,
    mm_cast,
    row,
)
from pallas_kernels.config import (
    CHUNK,
    NUM_SUB,
    SUB,
    ChunkConfig,
    state_pass_launch,
    state_runs,
    state_tile_v,
)
from pallas_kernels.state_walk import (
    WalkRefs,
    part_chunks,
    state_pass_inputs,
    state_pass_outputs,
    walk_chunks,
)

HALF = SUB // 2
_PAIRS = tuple((i, j) for i in range(1, NUM_SUB) for j in range(i))


def _cumsum_kernel(g_ref, G_ref, gc_ref, *, H, bk):
    c, bh, kb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows, ks = pl.ds(c * CHUNK, CHUNK), pl.ds(pl.multiple_of(kb * bk, bk), bk)
    G = jnp.cumsum(g_ref[bh // H, rows, bh % H, ks].astype(F32), axis=0)
    G_ref[bh, rows, ks] = G
    gc_ref[bh, c, ks] = row(G, CHUNK - 1)


def chunk_cumsum(g, *, cfg: ChunkConfig, num: Numerics):
    """G [BH, Tp, K]: the within-chunk cumulative log-decay of g [B, Tp, H, K] (float32), and
    gc [BH, NT, K]: G at each chunk's last row (the chunk's total decay). `cfg.cumsum` "pallas"
    forms both in one launch that writes the per-head layout directly; "xla" by jnp.cumsum and
    a transpose."""
    B, Tp, H, K = g.shape
    if cfg.cumsum == "xla":
        G = jnp.cumsum(g.astype(F32).reshape(B, Tp // CHUNK, CHUNK, H, K), axis=2)
        G = G.reshape(B, Tp, H, K).transpose(0, 2, 1, 3).reshape(B * H, Tp, K)
        return G, G[:, CHUNK - 1 :: CHUNK]
    bk = min(cfg.cumsum_block_k, K)
    return pl.pallas_call(
        functools.partial(_cumsum_kernel, H=H, bk=bk),
        out_shape=[
            jax.ShapeDtypeStruct((B * H, Tp, K), F32),
            jax.ShapeDtypeStruct((B * H, Tp // CHUNK, K), F32),
        ],
        grid=(Tp // CHUNK, B * H, K // bk),
        compiler_params=compiler_params(cfg.cumsum_launch),
        interpret=num.interpret,
        name="gdn2_chunk_cumsum",
    )(g)


def _offdiag_scores(
    q_ref, k_ref, b_ref, G_ref, bi, h, bh, t0, *, K, bk, scale, num, outputs=("a", "t")
):
    """A_qk ("a") and T ("t") on the sub-blocks below the diagonal, factored through the
    boundary n = first row of the row block: exp(G_r − G_n) · exp(G_n − G_s) with s < n ≤ r,
    both exponents ≤ 0. `outputs` names the ones to form (a dict of blocks each)."""

    def body(kb, accs):
        ks = pl.ds(pl.multiple_of(kb * bk, bk), bk)
        k = [k_ref[bi, pl.ds(t0 + SUB * j, SUB), h, ks].astype(F32) for j in range(NUM_SUB)]
        G = [G_ref[bh, pl.ds(t0 + SUB * j, SUB), ks] for j in range(NUM_SUB)]
        accs = dict(zip(_PAIRS, zip(*accs, strict=True), strict=True))
        out = {}
        for i in range(1, NUM_SUB):
            rows = pl.ds(t0 + SUB * i, SUB)
            Gn = G_ref[bh, t0 + SUB * i, ks][None, :]
            decay_row = jnp.exp(G[i] - Gn)
            left = {}
            if "a" in outputs:
                left["a"] = q_ref[bi, rows, h, ks].astype(F32) * (scale * decay_row)
            if "t" in outputs:
                left["t"] = b_ref[bi, rows, h, ks].astype(F32) * k[i] * decay_row
            for j in range(i):
                kf = k[j] * jnp.exp(Gn - G[j])
                out[(i, j)] = tuple(
                    acc + mm(left[name], kf, num.score_precision, tb=True)
                    for name, acc in zip(outputs, accs[(i, j)], strict=True)
                )
        return tuple(zip(*(out[p] for p in _PAIRS), strict=True))

    zero = jnp.zeros((SUB, SUB), F32)
    init = ((zero,) * len(_PAIRS),) * len(outputs)
    blocks = jax.lax.fori_loop(0, K // bk, body, init)
    return tuple(dict(zip(_PAIRS, b, strict=True)) for b in blocks)


def _offdiag_scores_by_pair(
    q_ref, k_ref, b_ref, G_ref, bi, h, bh, t0, *, K, bk, scale, num, outputs=("a", "t")
):
    """`_offdiag_scores` with one K loop per block pair (i, j): each loop holds only its
    pair's accumulators and loads, at the cost of loading row block i's and j's slices once
    per pair instead of once per slice."""
    blocks = {name: {} for name in outputs}
    for i, j in _PAIRS:
        rows_i, rows_j = pl.ds(t0 + SUB * i, SUB), pl.ds(t0 + SUB * j, SUB)

        def body(kb, accs, rows_i=rows_i, rows_j=rows_j, n=t0 + SUB * i):
            ks = pl.ds(pl.multiple_of(kb * bk, bk), bk)
            Gn = G_ref[bh, n, ks][None, :]
            decay_row = jnp.exp(G_ref[bh, rows_i, ks] - Gn)
            kf = k_ref[bi, rows_j, h, ks].astype(F32) * jnp.exp(Gn - G_ref[bh, rows_j, ks])
            left = {}
            if "a" in outputs:
                left["a"] = q_ref[bi, rows_i, h, ks].astype(F32) * (scale * decay_row)
            if "t" in outputs:
                k_i = k_ref[bi, rows_i, h, ks].astype(F32)
                left["t"] = b_ref[bi, rows_i, h, ks].astype(F32) * k_i * decay_row
            return tuple(
                acc + mm(left[name], kf, num.score_precision, tb=True)
                for name, acc in zip(outputs, accs, strict=True)
            )

        zero = jnp.zeros((SUB, SUB), F32)
        accs = jax.lax.fori_loop(0, K // bk, body, (zero,) * len(outputs))
        for name, acc in zip(outputs, accs, strict=True):
            blocks[name][(i, j)] = acc
    return tuple(blocks[name] for name in outputs)


def _diag_scores(
    q_ref, k_ref, b_ref, G_ref, bi, h, bh, r0, *, K, bk, scale, precision, put=None
):  # fmt: skip
    """A diagonal 16×16 block. Its lower-left 8×8 quadrant is one factored product through the
    boundary n = r0 + 8 (both exponents ≤ 0, as off the diagonal); the two diagonal 8×8
    quadrants go column by column, columns j and j + 8 in one step, masked before the exp.
    Each step's columns go into the returned tiles, or with `put` to put(j, a_col, t_col)
    (rows < 8 are column j, the rest column j + 8), and the tiles hold only the quadrant.
    With bk < K every product is summed over K slices of bk (fewer live [16, bk] tiles; not
    with `put`, which stores each column once)."""
    rows = pl.ds(r0, SUB)
    r_k = iota((SUB, bk), 0)
    lower = r_k >= HALF
    r_1 = iota((SUB,), 0)
    col = iota((SUB, SUB), 1)
    shift_k = jnp.where(lower, HALF, 0)
    shift_1 = jnp.where(r_1 >= HALF, HALF, 0)

    def slice_scores(ks, acc):
        """This K slice's products, added to `acc` (the earlier slices' tiles) unless None."""
        q = q_ref[bi, rows, h, ks].astype(F32) * scale
        k = k_ref[bi, rows, h, ks].astype(F32)
        bk_ = b_ref[bi, rows, h, ks].astype(F32) * k
        G = G_ref[bh, rows, ks]
        Gn = G_ref[bh, r0 + HALF, ks][None, :]
        to_n = jnp.exp(jnp.where(lower, G - Gn, -jnp.inf))
        kf = k * jnp.exp(jnp.where(lower, -jnp.inf, Gn - G))
        a_d, t_d = mm(q * to_n, kf, precision, tb=True), mm(bk_ * to_n, kf, precision, tb=True)
        if acc is not None:
            a_d, t_d = acc[0] + a_d, acc[1] + t_d

        def body(j, carry):
            a_d, t_d = carry
            kj = jnp.where(
                lower, k_ref[bi, r0 + HALF + j, h, ks][None, :], k_ref[bi, r0 + j, h, ks]
            )
            Gj = jnp.where(lower, G_ref[bh, r0 + HALF + j, ks][None, :], G_ref[bh, r0 + j, ks])
            kE = kj.astype(F32) * jnp.exp(jnp.where(r_k >= j + shift_k, G - Gj, -jnp.inf))
            c = j + shift_1
            a_col = jnp.sum(q * kE, axis=1)
            t_col = jnp.where(r_1 > c, jnp.sum(bk_ * kE, axis=1), 0.0)
            if put is not None:
                put(j, a_col, t_col)
                return carry
            here = col == c[:, None]
            a_new, t_new = a_col[:, None], t_col[:, None]
            if acc is not None:  # the diagonal quadrants hold the earlier slices' sums
                a_new, t_new = a_d + a_new, t_d + t_new
            return jnp.where(here, a_new, a_d), jnp.where(here, t_new, t_d)

        return jax.lax.fori_loop(0, HALF, body, (a_d, t_d))

    if bk == K:
        return slice_scores(slice(None), None)

    def slice_body(kb, acc):
        return slice_scores(pl.ds(pl.multiple_of(kb * bk, bk), bk), acc)

    zeros = jnp.zeros((SUB, SUB), F32)
    return jax.lax.fori_loop(0, K // bk, slice_body, (zeros, zeros))


def _level_midpoints(G_ref, bh, r0, level, ks):
    """[16, |ks|]: row r holds G at the midpoint of its 2**level-row block (rows r0..r0 + 15)."""
    s, r_k = 1 << level, iota((SUB, ks.size), 0)
    Gn = G_ref[bh, r0 + s // 2, ks][None, :]
    for start in range(s, SUB, s):
        Gn = jnp.where(r_k >= start, G_ref[bh, r0 + start + s // 2, ks][None, :], Gn)
    return Gn


def _diag_scores_levels(q_ref, k_ref, b_ref, G_ref, bi, h, bh, r0, *, K, bk, scale, precision):
    """A diagonal 16×16 block without a column loop. At each level s = 16, 8, 4, 2 the
    lower-left (s/2)-quadrant of every s-row block is a product factored through that block's
    midpoint n: rows r >= n scaled by exp(G_r − G_n), columns j < n by exp(G_n − G_j), both
    exponents <= 0 (masked before the exp), so every entry is exact for any g <= 0. A level's
    quadrants are one [16, bk] x [bk, 16] matmul masked to them, summed over K slices of `bk`
    (fewer live tiles: at bk = K the launch ran out of registers); the diagonal is q_r · k_r."""
    rows = pl.ds(r0, SUB)
    r, c, r_k = iota((SUB, SUB), 0), iota((SUB, SUB), 1), iota((SUB, bk), 0)
    levels = []  # (level, its quadrants in the block, the rows at or below each midpoint)
    for level in range(SUB.bit_length() - 1, 0, -1):
        s, half = 1 << level, 1 << (level - 1)
        quadrant = ((r >> level) == (c >> level)) & ((r & (s - 1)) >= half) & ((c & (s - 1)) < half)
        levels.append((level, quadrant, (r_k & (s - 1)) >= half))

    def slice_body(kb, carry):
        a_d, t_d = carry
        ks = pl.ds(pl.multiple_of(kb * bk, bk), bk)
        q = q_ref[bi, rows, h, ks].astype(F32) * scale
        k = k_ref[bi, rows, h, ks].astype(F32)
        bk_ = b_ref[bi, rows, h, ks].astype(F32) * k
        G = G_ref[bh, rows, ks]
        a_d = a_d + jnp.where(r == c, mm(q, k, precision, tb=True), 0.0)
        for level, quadrant, lower in levels:
            Gn = _level_midpoints(G_ref, bh, r0, level, ks)
            to_n = jnp.exp(jnp.where(lower, G - Gn, -jnp.inf))
            kf = k * jnp.exp(jnp.where(lower, -jnp.inf, Gn - G))
            a_d = a_d + jnp.where(quadrant, mm(q * to_n, kf, precision, tb=True), 0.0)
            t_d = t_d + jnp.where(quadrant, mm(bk_ * to_n, kf, precision, tb=True), 0.0)
        return a_d, t_d

    zeros = jnp.zeros((SUB, SUB), F32)
    return jax.lax.fori_loop(0, K // bk, slice_body, (zeros, zeros))


def _invert_unit_lower(t):
    """(I + t)⁻¹ for a strictly lower 16×16 t by forward substitution (exact float32)."""
    r = iota((SUB, SUB), 0)

    def body(i, ai):
        a = -row(t, i)
        a = a + jnp.sum(a[:, None] * ai, axis=0)
        return jnp.where(r == i, a[None, :], ai)

    ai = jax.lax.fori_loop(2, SUB, body, -t)
    return ai + (r == iota((SUB, SUB), 1)).astype(F32)


def _solve_blocks(t, precision):
    """(I + T)⁻¹ as {(i, j): block}: diagonal blocks by substitution, the rest by block
    substitution X_ij = −X_ii Σ_m T_im X_mj at full float32 precision (never a power series)."""
    x = {(i, i): _invert_unit_lower(t[(i, i)]) for i in range(NUM_SUB)}
    return merge_blocks(t, x, precision)


def merge_blocks(t, x, precision):
    """Completes the inverse `x` (its diagonal blocks given) by block substitution
    X_ij = −X_ii Σ_m T_im X_mj, one block diagonal after the other."""
    for d in range(1, NUM_SUB):
        for i in range(d, NUM_SUB):
            j = i - d
            acc = sum(mm(t[(i, m)], x[(m, j)], precision) for m in range(j, i))
            x[(i, j)] = -mm(x[(i, i)], acc, precision)
    return x


def _store_blocks(ref, bh, t0, blocks, dtype):
    zero = jnp.zeros((SUB, SUB), dtype)
    for i in range(NUM_SUB):
        for j in range(NUM_SUB):
            blk = blocks[(i, j)].astype(dtype) if j <= i else zero
            ref[bh, pl.ds(t0 + SUB * i, SUB), pl.ds(SUB * j, SUB)] = blk


def u_tile(A, v_ref, w_ref, u_ref, bi, h, bh, rows, vs, num):
    """U = A (w ⊙ v) on the value columns `vs` of one chunk (A = (I + T)⁻¹, loaded)."""
    z = v_ref[bi, rows, h, vs].astype(F32) * w_ref[bi, rows, h, vs].astype(F32)
    u_ref[bh, rows, vs] = mm_cast(A, z, num).astype(u_ref.dtype)


class KeyRefs(NamedTuple):
    """The refs `key_tiles` reads (q, k, b [B, Tp, H, K]; G [BH, Tp, K]; gc [BH, NT, K]) and
    writes (y, qg, kt [BH, Tp, K])."""

    q: Any
    k: Any
    b: Any
    G: Any
    gc: Any
    y: Any
    qg: Any
    kt: Any


def key_tiles(A, refs: KeyRefs, bi, h, bh, c, ks, *, scale, num):
    """Y = A Ē, Q_γ = scale·q ⊙ γ and K_tail = k ⊙ exp(G_C − G) on the key columns `ks`."""
    rows = pl.ds(c * CHUNK, CHUNK)
    dt = refs.y.dtype
    G = refs.G[bh, rows, ks]
    gamma = jnp.exp(G)
    k = refs.k[bi, rows, h, ks].astype(F32)
    e = refs.b[bi, rows, h, ks].astype(F32) * k * gamma
    refs.y[bh, rows, ks] = mm_cast(A, e, num).astype(dt)
    refs.qg[bh, rows, ks] = (refs.q[bi, rows, h, ks].astype(F32) * (scale * gamma)).astype(dt)
    refs.kt[bh, rows, ks] = (k * jnp.exp(refs.gc[bh, c, ks][None, :] - G)).astype(dt)


def _aux(
    key_refs: KeyRefs, v_ref, w_ref, ainv_ref, u_ref, bi, h, bh, c, *, K, V, scale, block, num
):
    """U = A (w ⊙ v), Y = A Ē, Q_γ = scale·q ⊙ γ, K_tail = k ⊙ exp(G_C − G), by column slices
    (A = (I + T)⁻¹ from `ainv_ref`; U into `u_ref`, the rest through `key_refs`)."""
    rows = pl.ds(c * CHUNK, CHUNK)
    A = ainv_ref[bh, rows, :]
    bv, bk = min(block, V), min(block, K)

    def v_body(vb, carry):
        vs = pl.ds(pl.multiple_of(vb * bv, bv), bv)
        u_tile(A, v_ref, w_ref, u_ref, bi, h, bh, rows, vs, num)
        return carry

    def k_body(kb, carry):
        ks = pl.ds(pl.multiple_of(kb * bk, bk), bk)
        key_tiles(A, key_refs, bi, h, bh, c, ks, scale=scale, num=num)
        return carry

    jax.lax.fori_loop(0, V // bv, v_body, 0)
    jax.lax.fori_loop(0, K // bk, k_body, 0)


def _diag_levels_kernel(q_ref, k_ref, b_ref, G_ref, a_ref, t_ref, *, H, K, bk, scale, precision):
    s, bh = pl.program_id(0), pl.program_id(1)
    rows = pl.ds(s * SUB, SUB)
    a_ref[bh, rows, :], t_ref[bh, rows, :] = _diag_scores_levels(
        q_ref, k_ref, b_ref, G_ref, bh // H, bh % H, bh, s * SUB, K=K, bk=bk, scale=scale,
        precision=precision,
    )  # fmt: skip


def _diag_kernel(
    q_ref, k_ref, b_ref, G_ref, a_ref, t_ref, *, H, K, bk, scale, precision, columns
):  # fmt: skip
    s, bh = pl.program_id(0), pl.program_id(1)
    r0 = s * SUB
    rows = pl.ds(r0, SUB)
    put = None
    if columns:
        upper = iota((SUB,), 0) < HALF

        def put(j, a_col, t_col):
            for ref, x in ((a_ref, a_col), (t_ref, t_col)):
                pltriton.store(ref.at[bh, rows, j], x, mask=upper)
                pltriton.store(ref.at[bh, rows, j + HALF], x, mask=~upper)

    bi, h = bh // H, bh % H
    a_d, t_d = _diag_scores(
        q_ref, k_ref, b_ref, G_ref, bi, h, bh, r0, K=K, bk=bk, scale=scale, precision=precision,
        put=put,
    )  # fmt: skip
    if columns:
        # Only the off-diagonal quadrants: the diagonal ones are the columns already stored.
        r, c = iota((SUB, SUB), 0), iota((SUB, SUB), 1)
        off_diagonal = (r < HALF) != (c < HALF)
        pltriton.store(a_ref.at[bh, rows, :], a_d, mask=off_diagonal)
        pltriton.store(t_ref.at[bh, rows, :], t_d, mask=off_diagonal)
    else:
        a_ref[bh, rows, :] = a_d
        t_ref[bh, rows, :] = t_d


def _diag_token_kernel(q_ref, k_ref, b_ref, G_ref, a_ref, t_ref, *, H, K, scale):
    """Row r of its sub-block's diagonal blocks: every pairwise decay exp(G_r − G_j), j ≤ r, is
    formed exactly (no factorization), masked before the exp."""
    r, bh = pl.program_id(0), pl.program_id(1)
    bi, h = bh // H, bh % H
    i = r % SUB
    block = pl.ds(pl.multiple_of(r - i, SUB), SUB)
    j = iota((SUB, K), 0)
    G_r = G_ref[bh, r, :][None, :]
    kE = k_ref[bi, block, h, :].astype(F32) * jnp.exp(
        jnp.where(j <= i, G_r - G_ref[bh, block, :], -jnp.inf)
    )
    q_r = q_ref[bi, r, h, :].astype(F32) * scale
    bk_r = b_ref[bi, r, h, :].astype(F32) * k_ref[bi, r, h, :].astype(F32)
    a_ref[bh, r, :] = jnp.sum(q_r[None, :] * kE, axis=1)
    t_ref[bh, r, :] = jnp.where(iota((SUB,), 0) < i, jnp.sum(bk_r[None, :] * kE, axis=1), 0.0)


def chunk_diag(q, k, b, G, *, scale, cfg: ChunkConfig, num: Numerics):
    """The diagonal 16×16 blocks of A_qk (j ≤ r) and T (j < r), float32 [BH, Tp, 16] each."""
    B, Tp, H, K = q.shape
    if cfg.diag_grid == "token":
        kernel = functools.partial(_diag_token_kernel, H=H, K=K, scale=scale)
        grid = (Tp, B * H)
    elif cfg.diag_blocks == "levels":
        kernel = functools.partial(
            _diag_levels_kernel, H=H, K=K, bk=min(cfg.diag_block_k, K), scale=scale,
            precision=num.score_precision,
        )  # fmt: skip
        grid = (Tp // SUB, B * H)
    else:
        bk = K if cfg.diag_loop_block_k is None else min(cfg.diag_loop_block_k, K)
        if bk < K and cfg.diag_store == "columns":
            raise ValueError(
                f"ChunkConfig.diag_loop_block_k={cfg.diag_loop_block_k} < K={K} needs "
                'diag_store="tile" (a stored column cannot take the later slices\' sums)'
            )
        kernel = functools.partial(
            _diag_kernel, H=H, K=K, bk=bk, scale=scale, precision=num.score_precision,
            columns=cfg.diag_store == "columns",
        )  # fmt: skip
        grid = (Tp // SUB, B * H)
    block = jax.ShapeDtypeStruct((B * H, Tp, SUB), F32)
    return pl.pallas_call(
        kernel,
        out_shape=[block, block],
        grid=grid,
        compiler_params=compiler_params(cfg.diag),
        interpret=num.interpret,
        name="gdn2_chunk_fwd_diag",
    )(q, k, b, G)


def _intra_kernel(
    q_ref, k_ref, b_ref, v_ref, w_ref, G_ref, gc_ref, a_diag_ref, t_diag_ref,
    aqk_ref, ainv_ref, u_ref, y_ref, qg_ref, kt_ref,
    *, H, K, V, scale, cfg, num,
):  # fmt: skip
    c, bh = pl.program_id(0), pl.program_id(1)
    bi, h = bh // H, bh % H
    t0 = c * CHUNK
    bk = min(cfg.intra_block_k, K)
    a_off, t_off = _offdiag_scores(
        q_ref, k_ref, b_ref, G_ref, bi, h, bh, t0, K=K, bk=bk, scale=scale, num=num
    )
    a_blocks, t_blocks = dict(a_off), dict(t_off)
    for i in range(NUM_SUB):
        rows = pl.ds(t0 + SUB * i, SUB)
        a_blocks[(i, i)], t_blocks[(i, i)] = a_diag_ref[bh, rows, :], t_diag_ref[bh, rows, :]
    _store_blocks(aqk_ref, bh, t0, a_blocks, aqk_ref.dtype)
    _store_blocks(ainv_ref, bh, t0, _solve_blocks(t_blocks, num.solve_precision), ainv_ref.dtype)
    barrier(num)
    key_refs = KeyRefs(q=q_ref, k=k_ref, b=b_ref, G=G_ref, gc=gc_ref, y=y_ref, qg=qg_ref, kt=kt_ref)
    _aux(
        key_refs, v_ref, w_ref, ainv_ref, u_ref, bi, h, bh, c,
        K=K, V=V, scale=scale, block=cfg.aux_block, num=num,
    )  # fmt: skip


def chunk_intra(q, k, v, g, b, w, *, scale, cfg: ChunkConfig, num: Numerics):
    """State-independent chunk quantities, as a dict of G [BH, Tp, K] f32, gc [BH, NT, K] f32
    (G at the chunk's last row), aqk and ainv [BH, Tp, 64], u [BH, Tp, V], y, qg, kt [BH, Tp, K]
    (the last six in the matmul dtype)."""
    B, Tp, H, K = q.shape
    V = v.shape[-1]
    BH, dt = B * H, num.mm_dtype
    G, gc = chunk_cumsum(g, cfg=cfg, num=num)
    a_diag, t_diag = chunk_diag(q, k, b, G, scale=scale, cfg=cfg, num=num)
    shapes = dict(
        aqk=(BH, Tp, CHUNK, dt),
        ainv=(BH, Tp, CHUNK, dt),
        u=(BH, Tp, V, dt),
        y=(BH, Tp, K, dt),
        qg=(BH, Tp, K, dt),
        kt=(BH, Tp, K, dt),
    )
    kernel = functools.partial(_intra_kernel, H=H, K=K, V=V, scale=scale, cfg=cfg, num=num)
    outs = pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct(s[:-1], s[-1]) for s in shapes.values()],
        grid=(Tp // CHUNK, BH),
        compiler_params=compiler_params(cfg.intra),
        interpret=num.interpret,
        name="gdn2_chunk_fwd_intra",
    )(q, k, b, v, w, G, gc, a_diag, t_diag)
    return {"G": G, "gc": gc, **dict(zip(shapes, outs, strict=True))}


def _state_kernel(
    seq_ref, first_ref, last_ref, h0_ref, fin0_ref,
    y_ref, u_ref, qg_ref, kt_ref, aqk_ref, gc_ref, s_in_ref,
    o_ref, fin_ref, s0_ref=None, r_ref=None,
    *, H, NT, parts, bv, num,
):  # fmt: skip
    """One program per (V block, batch·head, part of the row's chunks); s_in_ref: the state
    entering each part. s0_ref, r_ref: each chunk's S₀ and R, outputs of the residual-saving
    variant only (None in the other, whose pallas_call has two outputs)."""
    vb, bh, part = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bi, h = bh // H, bh % H
    vs = pl.ds(pl.multiple_of(vb * bv, bv), bv)
    del fin0_ref  # aliased to fin_ref: slots no chunk finishes keep their zeros

    def emit(c, rows, S, Rd):
        o = mm_cast(qg_ref[bh, rows, :], S, num) + mm_cast(aqk_ref[bh, rows, :], Rd, num)
        o_ref[bi, rows, h, vs] = o.astype(o_ref.dtype)
        if s0_ref is not None:
            s0_ref[bh, c, :, vs] = S.astype(s0_ref.dtype)
            r_ref[bh, rows, vs] = Rd

    walk_refs = WalkRefs(
        seq=seq_ref, first=first_ref, last=last_ref, h0=h0_ref,
        y=y_ref, u=u_ref, kt=kt_ref, gc=gc_ref, fin=fin_ref,
    )  # fmt: skip
    S = s_in_ref[bh, part, :, vs]
    walk_chunks(walk_refs, bh, vs, S, part_chunks(part, NT, parts), H=H, num=num, emit=emit)


def chunk_state(intra, h0s, segments, out_dtype, *, cfg: ChunkConfig, num: Numerics, save):
    """The inter-chunk pass. Returns o [B, Tp, H, V], finals [N+1, B, H, K, V] f32 and, with
    `save`, each chunk's initial state s0 [BH, NT, K, V] and residual R [BH, Tp, V]."""
    _, _, H, K, V = h0s.shape
    BH, Tp, _ = intra["u"].shape
    NT = Tp // CHUNK
    bv = state_tile_v(cfg.state_block_v, K, V)
    parts = state_runs(cfg.state_parts, BH * (V // bv), NT)
    out_shape = state_pass_outputs(h0s, BH, Tp, out_dtype, num.mm_dtype, save=save)
    kernel = functools.partial(_state_kernel, H=H, NT=NT, parts=parts, bv=bv, num=num)
    names = ("y", "u", "qg", "kt", "aqk", "gc")
    outs = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(V // bv, BH, parts),
        input_output_aliases={ZEROS_INPUT: 1},
        compiler_params=compiler_params(state_pass_launch(cfg.state, K)),
        interpret=num.interpret,
        name="gdn2_chunk_fwd_state" + ("_save" if save else ""),
    )(*state_pass_inputs(intra, h0s, segments, names, parts, cfg=cfg, num=num))
    return outs
