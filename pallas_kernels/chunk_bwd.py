"""Backward kernels of the chunkwise WY algorithm (paper App. B, C.3).

`chunk_dstate`: the reverse state pass, one program per (V block, batch·head), the state gradient
dS [K, BV] resident in registers: per chunk dR = A_qkᵀ dO + K_tail dS_C and
dS₀ = Diag(γ_C) dS_C + Q_γᵀ dO − Yᵀ dR (the output-path dR is folded in here, so no separate
output-VJP launch is needed). `chunk_wy_bwd`: per chunk, the output and state VJPs that need the
stored states (dA_qk = dO Rᵀ, dQ_γ, dK_tail, dY) and the gate-aware WY VJP with the gates inside
the dA products (Eqs. 64–66): dA = dU Zᵀ + dY Ēᵀ, dT = −tril(Aᵀ dA Aᵀ, −1). `chunk_intra_bwd`: the
VJP through A_qk and T with the same safe factorization as the forward, then the reverse cumulative
sum that turns dG into dg.

Every decay derivative is taken in log space (X = f ⊙ exp(G_a − G_b) gives dG_a += dX ⊙ X and
dG_b −= dX ⊙ X), so no γ⁻¹ appears in the backward either.
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.common import F32, ZEROS_INPUT, Numerics, compiler_params, iota, mm, mm_cast
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
    any_in_parts,
    carry_across_parts,
    identity_columns,
    maps_call,
    part_chunks,
)


class _DstateRefs(NamedTuple):
    """What the reverse state pass reads: seq, first, last [NT] int32; dfin [N+1, B, H, K, V]
    f32; do [B, Tp, H, V]; aqk, kt, qg, y [BH, Tp, ·]; gc [BH, NT, K]."""

    seq: Any
    first: Any
    last: Any
    dfin: Any
    do: Any
    aqk: Any
    kt: Any
    qg: Any
    y: Any
    gc: Any


def _dstate_update(refs: _DstateRefs, bi, h, bh, c, vs, dS, num, *, with_do=True):
    """One chunk of the reverse recurrence on the columns `vs`: dR = A_qkᵀ dO + K_tail dS
    (K_tail dS without dO) in the matmul dtype and dS ← Diag(γ_C) dS + Q_γᵀ dO − Yᵀ dR."""
    rows = pl.ds(c * CHUNK, CHUNK)
    do = refs.do[bi, rows, h, vs] if with_do else None
    dR = mm_cast(refs.kt[bh, rows, :], dS, num)
    if with_do:
        dR = mm_cast(refs.aqk[bh, rows, :], do, num, ta=True) + dR
    dRd = dR.astype(num.mm_dtype)
    dS = jnp.exp(refs.gc[bh, c, :])[:, None] * dS
    if with_do:
        dS = dS + mm_cast(refs.qg[bh, rows, :], do, num, ta=True)
    return dRd, dS - mm_cast(refs.y[bh, rows, :], dRd, num, ta=True)


def _dstate_kernel(
    seq_ref, first_ref, last_ref, dfin_ref, dh00_ref,
    do_ref, aqk_ref, kt_ref, qg_ref, y_ref, gc_ref, ds_in_ref,
    dsc_ref, dr_ref, dh0_ref,
    *, H, NT, parts, bv, num,
):  # fmt: skip
    """One program per (V block, batch·head, run of the row's chunks), walking its run from
    the last chunk with the gradient entering it from the later runs (ds_in_ref)."""
    vb, bh, part = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bi, h = bh // H, bh % H
    vs = pl.ds(pl.multiple_of(vb * bv, bv), bv)
    del dh00_ref  # aliased to dh0_ref: slots no chunk starts keep their zeros
    refs = _DstateRefs(
        seq=seq_ref, first=first_ref, last=last_ref, dfin=dfin_ref, do=do_ref, aqk=aqk_ref,
        kt=kt_ref, qg=qg_ref, y=y_ref, gc=gc_ref,
    )  # fmt: skip
    start, stop = part_chunks(part, NT, parts)

    def body(i, dS):
        c = stop - 1 - i
        slot = seq_ref[c]
        dS = jax.lax.cond(last_ref[c] != 0, lambda: dfin_ref[slot, bi, h, :, vs], lambda: dS)
        dsc_ref[bh, c, :, vs] = dS.astype(dsc_ref.dtype)
        dRd, dS = _dstate_update(refs, bi, h, bh, c, vs, dS, num)
        dr_ref[bh, pl.ds(c * CHUNK, CHUNK), vs] = dRd

        @pl.when(first_ref[c] != 0)
        def _():
            dh0_ref[slot, bi, h, :, vs] = dS

        # The state was reset at this chunk: nothing flows into the previous chunk.
        return jnp.where(first_ref[c] != 0, 0.0, dS)

    jax.lax.fori_loop(0, stop - start, body, ds_in_ref[bh, part, :, vs])


def _dstate_part_maps_kernel(
    seq_ref, first_ref, last_ref, dfin_ref, do_ref, aqk_ref, kt_ref, qg_ref, y_ref, gc_ref,
    n_ref, m_ref,
    *, H, K, V, NT, parts, bv, num,
):  # fmt: skip
    """A run's reverse map, as `state_walk`'s forward one: N from a zero gradient with dO,
    M from the identity without (zero past a sequence's end or start)."""
    col, bh, part = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bi, h = bh // H, bh % H
    refs = _DstateRefs(
        seq=seq_ref, first=first_ref, last=last_ref, dfin=dfin_ref, do=do_ref, aqk=aqk_ref,
        kt=kt_ref, qg=qg_ref, y=y_ref, gc=gc_ref,
    )  # fmt: skip
    start, stop = part_chunks(part, NT, parts)
    n_value_tiles, bm = V // bv, min(bv, K)

    def walk(cols, dS, with_do):
        def body(i, dS):
            c = stop - 1 - i
            if with_do:
                dS = jax.lax.cond(
                    last_ref[c] != 0, lambda: dfin_ref[seq_ref[c], bi, h, :, cols], lambda: dS
                )
            else:
                dS = jnp.where(last_ref[c] != 0, 0.0, dS)
            dS = _dstate_update(refs, bi, h, bh, c, cols, dS, num, with_do=with_do)[1]
            return jnp.where(first_ref[c] != 0, 0.0, dS)

        return jax.lax.fori_loop(0, stop - start, body, dS)

    @pl.when(col < n_value_tiles)
    def _():
        vs = pl.ds(pl.multiple_of(col * bv, bv), bv)
        n_ref[bh, part, :, vs] = walk(vs, jnp.zeros((K, bv), F32), with_do=True)

    @pl.when(col >= n_value_tiles)
    def _():
        m0 = (col - n_value_tiles) * bm
        ms = pl.ds(pl.multiple_of(m0, bm), bm)
        m_ref[bh, part, :, ms] = walk(ms, identity_columns(K, bm, m0), with_do=False)


def _dstate_part_states(segments, dfinals, reads, BH, NT, parts, *, cfg: ChunkConfig, num):
    """The gradient entering each run from the later ones [BH, parts, K, V] float32; `segments`
    (int32) and `reads` (do and the forward's `_DSTATE_INTRA`) as the reverse pass takes them."""
    _, _, H, K, V = dfinals.shape
    if parts == 1:
        return jnp.zeros((BH, 1, K, V), F32)
    bv = state_tile_v(cfg.dstate_block_v, K, V)
    kernel = functools.partial(
        _dstate_part_maps_kernel, H=H, K=K, V=V, NT=NT, parts=parts, bv=bv, num=num
    )
    n, m = maps_call(
        kernel, (*segments, dfinals.astype(F32), *reads), BH=BH, parts=parts, K=K, V=V, bv=bv,
        launch=cfg.dstate, num=num, name="gdn2_chunk_bwd_part_maps",
    )  # fmt: skip
    _, first, last = segments
    cut = any_in_parts((first != 0) | (last != 0), parts)
    return carry_across_parts(n, m, cut, reverse=True)


def chunk_dstate(intra, saved_shape, segments, do, dfinals, *, cfg: ChunkConfig, num: Numerics):
    """Reverse state pass. Returns dS_C per chunk [BH, NT, K, V], dR [BH, Tp, V] (matmul dtype)
    and dh0s [N+1, B, H, K, V] float32."""
    _, _, H, K, V = dfinals.shape
    BH, NT = saved_shape[:2]
    Tp = NT * CHUNK
    bv = state_tile_v(cfg.dstate_block_v, K, V)
    parts = state_runs(cfg.state_parts, BH * (V // bv), NT)
    segments = tuple(x.astype(jnp.int32) for x in segments)
    reads = (do, *(intra[n] for n in _DSTATE_INTRA))
    ds_in = _dstate_part_states(segments, dfinals, reads, BH, NT, parts, cfg=cfg, num=num)
    kernel = functools.partial(_dstate_kernel, H=H, NT=NT, parts=parts, bv=bv, num=num)
    return pl.pallas_call(
        kernel,
        out_shape=[
            jax.ShapeDtypeStruct((BH, NT, K, V), num.mm_dtype),
            jax.ShapeDtypeStruct((BH, Tp, V), num.mm_dtype),
            jax.ShapeDtypeStruct(dfinals.shape, F32),
        ],
        grid=(V // bv, BH, parts),
        input_output_aliases={ZEROS_INPUT: 2},
        compiler_params=compiler_params(state_pass_launch(cfg.dstate, K)),
        interpret=num.interpret,
        name="gdn2_chunk_bwd_dstate",
    )(*segments, dfinals.astype(F32), jnp.zeros(dfinals.shape, F32), *reads, ds_in)


# The forward's intermediates the reverse state pass reads, in its kernels' order.
_DSTATE_INTRA = ("aqk", "kt", "qg", "y", "gc")


class _ValueRefs(NamedTuple):
    """`_wy_value_side`'s refs: it reads v, w, do [B, Tp, H, V], r, dr [BH, Tp, V] and writes
    dv, dw [B, Tp, H, V]."""

    v: Any
    w: Any
    do: Any
    r: Any
    dr: Any
    dv: Any
    dw: Any


class _ProductRefs(NamedTuple):
    """What `_wy_state_products` reads: do [B, Tp, H, V], r, dr [BH, Tp, V], s0, dsc
    [BH, NT, K, V]."""

    do: Any
    r: Any
    dr: Any
    s0: Any
    dsc: Any


class _KeyGradRefs(NamedTuple):
    """`_wy_key_side`'s refs: it reads q, k, b [B, Tp, H, K], G [BH, Tp, K], gc [BH, NT, K]
    and writes the float32 partials dq, dk, db, dG [BH, Tp, K]."""

    q: Any
    k: Any
    b: Any
    G: Any
    gc: Any
    dq: Any
    dk: Any
    db: Any
    dG: Any  # noqa: N815 (G as in the paper, as dG_ref)


def _wy_value_side(refs: _ValueRefs, A, bi, h, bh, rows, *, V, bv, num):
    """dA_qk = dO Rᵀ; dA += dU Zᵀ with Z = w ⊙ v inside the product; dZ = Aᵀ dU → dv, dw."""

    def body(vb, carry):
        dA, daqk = carry
        vs = pl.ds(pl.multiple_of(vb * bv, bv), bv)
        dR = refs.dr[bh, rows, vs]
        v = refs.v[bi, rows, h, vs].astype(F32)
        w = refs.w[bi, rows, h, vs].astype(F32)
        daqk = daqk + mm_cast(refs.do[bi, rows, h, vs], refs.r[bh, rows, vs], num, tb=True)
        dA = dA + mm_cast(dR, v * w, num, tb=True)
        dZ = mm_cast(A, dR, num, ta=True)
        refs.dv[bi, rows, h, vs] = (dZ * w).astype(refs.dv.dtype)
        refs.dw[bi, rows, h, vs] = (dZ * v).astype(refs.dw.dtype)
        return dA, daqk

    zero = jnp.zeros((CHUNK, CHUNK), F32)
    return jax.lax.fori_loop(0, V // bv, body, (zero, zero))


def _wy_state_products(refs: _ProductRefs, bi, h, bh, c, rows, ks, *, V, bk, bv, num):
    """dQ_γ = dO S₀ᵀ, dK_tail = R dS_Cᵀ, −dY = dR S₀ᵀ and rowsum(dS_C ⊙ S₀) for one K slice."""

    def body(vb, acc):
        dqg, dkt, dyn, dgc = acc
        vs = pl.ds(pl.multiple_of(vb * bv, bv), bv)
        s0 = refs.s0[bh, c, ks, vs]
        dsc = refs.dsc[bh, c, ks, vs]
        dqg = dqg + mm_cast(refs.do[bi, rows, h, vs], s0, num, tb=True)
        dkt = dkt + mm_cast(refs.r[bh, rows, vs], dsc, num, tb=True)
        dyn = dyn + mm_cast(refs.dr[bh, rows, vs], s0, num, tb=True)
        dgc = dgc + jnp.sum(s0.astype(F32) * dsc.astype(F32), axis=1)
        return dqg, dkt, dyn, dgc

    zero = jnp.zeros((CHUNK, bk), F32)
    return jax.lax.fori_loop(0, V // bv, body, (zero, zero, zero, jnp.zeros((bk,), F32)))


def _wy_key_side(
    refs: _KeyGradRefs, prod_refs: _ProductRefs, A, dA, bi, h, bh, c, rows,
    *, K, V, scale, bk, bv, num,
):  # fmt: skip
    """Per K slice: the Q_γ, K_tail, γ_C and Ē (= γ ⊙ b ⊙ k, gates inside dA) VJPs."""
    last_row = iota((CHUNK, bk), 0) == CHUNK - 1

    def body(kb, dA):
        ks = pl.ds(pl.multiple_of(kb * bk, bk), bk)
        dqg, dkt, dyn, dgc = _wy_state_products(
            prod_refs, bi, h, bh, c, rows, ks, V=V, bk=bk, bv=bv, num=num
        )
        G = refs.G[bh, rows, ks]
        gcl = refs.gc[bh, c, ks][None, :]
        gamma, tail = jnp.exp(G), jnp.exp(gcl - G)
        q = refs.q[bi, rows, h, ks].astype(F32) * scale
        k = refs.k[bi, rows, h, ks].astype(F32)
        b = refs.b[bi, rows, h, ks].astype(F32)
        kt, e = k * tail, b * k * gamma
        dG = dqg * q * gamma - dkt * kt
        dGC = jnp.sum(dkt * kt, axis=0) + jnp.exp(gcl[0]) * dgc
        dE = -mm_cast(A, dyn, num, ta=True)
        dA = dA - mm_cast(dyn, e, num, tb=True)
        dG = dG + dE * e + jnp.where(last_row, dGC[None, :], 0.0)
        refs.dq[bh, rows, ks] = dqg * gamma
        refs.dk[bh, rows, ks] = dkt * tail + dE * b * gamma
        refs.db[bh, rows, ks] = dE * k * gamma
        refs.dG[bh, rows, ks] = dG
        return dA

    return jax.lax.fori_loop(0, K // bk, body, dA)


def _wy_kernel(
    q_ref, k_ref, v_ref, b_ref, w_ref, do_ref, G_ref, gc_ref, ainv_ref,
    s0_ref, r_ref, dsc_ref, dr_ref,
    dv_ref, dw_ref, dq_ref, dk_ref, db_ref, dG_ref, daqk_ref, dt_ref,
    *, H, K, V, scale, bk, bv, num,
):  # fmt: skip
    c, bh = pl.program_id(0), pl.program_id(1)
    bi, h = bh // H, bh % H
    rows = pl.ds(c * CHUNK, CHUNK)
    A = ainv_ref[bh, rows, :]
    value_refs = _ValueRefs(v=v_ref, w=w_ref, do=do_ref, r=r_ref, dr=dr_ref, dv=dv_ref, dw=dw_ref)
    dA, daqk = _wy_value_side(value_refs, A, bi, h, bh, rows, V=V, bv=bv, num=num)
    prod_refs = _ProductRefs(do=do_ref, r=r_ref, dr=dr_ref, s0=s0_ref, dsc=dsc_ref)
    key_refs = _KeyGradRefs(
        q=q_ref, k=k_ref, b=b_ref, G=G_ref, gc=gc_ref,
        dq=dq_ref, dk=dk_ref, db=db_ref, dG=dG_ref,
    )  # fmt: skip
    dA = _wy_key_side(
        key_refs, prod_refs, A, dA, bi, h, bh, c, rows,
        K=K, V=V, scale=scale, bk=bk, bv=bv, num=num,
    )  # fmt: skip
    r, col = iota((CHUNK, CHUNK), 0), iota((CHUNK, CHUNK), 1)
    # A is unit lower triangular: only its strictly lower entries are free (Eq. 66).
    dA = jnp.where(r > col, dA, 0.0)
    dT = mm_cast(mm_cast(A, dA, num, ta=True), A, num, tb=True)
    dt_ref[bh, rows, :] = jnp.where(r > col, -dT, 0.0)
    daqk_ref[bh, rows, :] = jnp.where(r >= col, daqk, 0.0)


def chunk_wy_bwd(q, k, v, b, w, do, intra, saved, dstate, *, scale, cfg, num):
    """Returns dv, dw (final, input dtypes) and float32 partials dq, dk, db, dG [BH, Tp, K]
    and dA_qk, dT [BH, Tp, 64]."""
    B, Tp, H, K = q.shape
    V = v.shape[-1]
    BH = B * H
    bk, bv = min(cfg.wy_block_k, K), min(cfg.wy_block_v, V)
    kernel = functools.partial(_wy_kernel, H=H, K=K, V=V, scale=scale, bk=bk, bv=bv, num=num)
    s0, r = saved
    dsc, dr = dstate
    return pl.pallas_call(
        kernel,
        out_shape=[
            jax.ShapeDtypeStruct(v.shape, v.dtype),
            jax.ShapeDtypeStruct(w.shape, w.dtype),
            *[jax.ShapeDtypeStruct((BH, Tp, K), F32)] * 4,
            *[jax.ShapeDtypeStruct((BH, Tp, CHUNK), F32)] * 2,
        ],
        grid=(Tp // CHUNK, BH),
        compiler_params=compiler_params(cfg.wy),
        interpret=num.interpret,
        name="gdn2_chunk_bwd_wy",
    )(q, k, v, b, w, do, intra["G"], intra["gc"], intra["ainv"], s0, r, dsc, dr)


def _intra_bwd_offdiag(
    q_ref, k_ref, b_ref, G_ref, daqk_ref, dt_ref, bi, h, bh, t0, p, G, ks, *, scale, bk, num
):
    """Sub-blocks off the diagonal through boundaries, both exponents ≤ 0: the row side of block
    p through its first row n (columns s < n), the column side through its last row m (rows > m)."""
    r0 = t0 + SUB * p
    rows, all_rows = pl.ds(r0, SUB), pl.ds(t0, CHUNK)
    pos = iota((CHUNK, bk), 0)
    G_all = G_ref[bh, all_rows, ks]
    k_all = k_ref[bi, all_rows, h, ks].astype(F32)
    dq = dbk = dk = jnp.zeros((SUB, bk), F32)
    if p > 0:
        Gn = G_ref[bh, r0, ks][None, :]
        kf = k_all * jnp.exp(jnp.where(pos < SUB * p, Gn - G_all, -jnp.inf))
        en = jnp.exp(G - Gn)
        dq = mm(daqk_ref[bh, rows, :], kf, num.score_precision) * en
        dbk = mm(dt_ref[bh, rows, :], kf, num.score_precision) * en
    if p < NUM_SUB - 1:
        Gm = G_ref[bh, r0 + SUB - 1, ks][None, :]
        em = jnp.exp(jnp.where(pos >= SUB * (p + 1), G_all - Gm, -jnp.inf))
        qf = q_ref[bi, all_rows, h, ks].astype(F32) * (scale * em)
        bkf = b_ref[bi, all_rows, h, ks].astype(F32) * k_all * em
        cols = pl.ds(SUB * p, SUB)
        dk = mm(daqk_ref[bh, all_rows, cols], qf, num.score_precision, ta=True)
        dk = dk + mm(dt_ref[bh, all_rows, cols], bkf, num.score_precision, ta=True)
        dk = dk * jnp.exp(Gm - G)
    return dq, dbk, dk


def _intra_bwd_diag_kernel(
    q_ref, k_ref, b_ref, G_ref, daqk_ref, dt_ref,
    dqd_ref, dbkd_ref, dkd_ref,
    *, H, scale, bk,
):  # fmt: skip
    """The diagonal block's VJP, every pair (r, j ≤ r) at once as a [16, 16, bk] tile with the
    exact pairwise decay E = exp(G_r − G_j), masked before the exp (float32, CUDA cores)."""
    s, kb, bh = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bi, h = bh // H, bh % H
    ks = pl.ds(pl.multiple_of(kb * bk, bk), bk)
    rows = pl.ds(s * SUB, SUB)
    cols = pl.ds(SUB * (s % NUM_SUB), SUB)
    q = q_ref[bi, rows, h, ks].astype(F32) * scale
    k = k_ref[bi, rows, h, ks].astype(F32)
    bk_ = b_ref[bi, rows, h, ks].astype(F32) * k
    G = G_ref[bh, rows, ks]
    causal = iota((SUB, SUB, 1), 1) <= iota((SUB, SUB, 1), 0)
    E = jnp.exp(jnp.where(causal, G[:, None, :] - G[None, :, :], -jnp.inf))
    aq = daqk_ref[bh, rows, cols][:, :, None]
    at = dt_ref[bh, rows, cols][:, :, None]
    kE = k[None, :, :] * E
    dqd_ref[bh, rows, ks] = jnp.sum(aq * kE, axis=1)
    dbkd_ref[bh, rows, ks] = jnp.sum(at * kE, axis=1)
    dkd_ref[bh, rows, ks] = jnp.sum((aq * q[:, None, :] + at * bk_[:, None, :]) * E, axis=0)


def _intra_bwd_kernel(
    q_ref, k_ref, b_ref, G_ref, daqk_ref, dt_ref, dqp_ref, dkp_ref, dbp_ref, dGp_ref,
    dqd_ref, dbkd_ref, dkd_ref,
    dq_ref, dk_ref, db_ref, dg_ref,
    *, H, scale, bk, num,
):  # fmt: skip
    c, kb, bh = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bi, h = bh // H, bh % H
    ks = pl.ds(pl.multiple_of(kb * bk, bk), bk)
    t0 = c * CHUNK
    suffix = jnp.zeros((bk,), F32)  # Σ dG over the rows after the current sub-block
    for p in reversed(range(NUM_SUB)):
        r0 = t0 + SUB * p
        rows, prow = pl.ds(r0, SUB), (bh, pl.ds(r0, SUB), ks)
        q = q_ref[bi, rows, h, ks].astype(F32) * scale
        k = k_ref[bi, rows, h, ks].astype(F32)
        b = b_ref[bi, rows, h, ks].astype(F32)
        G = G_ref[bh, rows, ks]
        dq, dbk, dk = _intra_bwd_offdiag(
            q_ref, k_ref, b_ref, G_ref, daqk_ref, dt_ref, bi, h, bh, t0, p, G, ks,
            scale=scale, bk=bk, num=num,
        )  # fmt: skip
        dq, dbk, dk = dq + dqd_ref[prow], dbk + dbkd_ref[prow], dk + dkd_ref[prow]
        dG = dGp_ref[prow] + q * dq + b * k * dbk - k * dk
        total = jnp.sum(dG, axis=0)
        # Reverse cumulative sum (Eq. 82) without a reverse scan: total − cumsum + x.
        dg = (suffix + total)[None, :] - jnp.cumsum(dG, axis=0) + dG
        suffix = suffix + total
        tok = (bi, rows, h, ks)
        dq_ref[tok] = ((dqp_ref[prow] + dq) * scale).astype(dq_ref.dtype)
        dk_ref[tok] = (dkp_ref[prow] + dk + dbk * b).astype(dk_ref.dtype)
        db_ref[tok] = (dbp_ref[prow] + dbk * k).astype(db_ref.dtype)
        dg_ref[tok] = dg


def _intra_bwd_diag_call(q, k, b, G, daqk, dt, *, scale, cfg, num):
    """The diagonal blocks' share of dq, d(b⊙k), dk, token-parallel: float32 [BH, Tp, K] each."""
    B, Tp, H, K = q.shape
    bk = min(cfg.intra_bwd_diag_block_k, K)
    kernel = functools.partial(_intra_bwd_diag_kernel, H=H, scale=scale, bk=bk)
    part = jax.ShapeDtypeStruct((B * H, Tp, K), F32)
    return pl.pallas_call(
        kernel,
        out_shape=[part, part, part],
        grid=(Tp // SUB, K // bk, B * H),
        compiler_params=compiler_params(cfg.intra_bwd_diag),
        interpret=num.interpret,
        name="gdn2_chunk_bwd_diag",
    )(q, k, b, G, daqk, dt)


def chunk_intra_bwd(q, k, b, G, wy, *, scale, cfg, num):
    """Final dq, dk, db (input dtypes) and dg (float32), all [B, Tp, H, K]."""
    B, Tp, H, K = q.shape
    bk = min(cfg.intra_bwd_block_k, K)
    dq_p, dk_p, db_p, dG_p, daqk, dt = wy
    diag = _intra_bwd_diag_call(q, k, b, G, daqk, dt, scale=scale, cfg=cfg, num=num)
    kernel = functools.partial(_intra_bwd_kernel, H=H, scale=scale, bk=bk, num=num)
    return pl.pallas_call(
        kernel,
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct(k.shape, k.dtype),
            jax.ShapeDtypeStruct(b.shape, b.dtype),
            jax.ShapeDtypeStruct(q.shape, F32),
        ],
        grid=(Tp // CHUNK, K // bk, B * H),
        compiler_params=compiler_params(cfg.intra_bwd),
        interpret=num.interpret,
        name="gdn2_chunk_bwd_intra",
    )(q, k, b, G, daqk, dt, dq_p, dk_p, db_p, dG_p, *diag)
