"""The forward under `ChunkConfig(structure="split")`: the same quantities as `chunk_fwd`, cut
into launches that each keep fewer tiles live and run more programs (pallas_kernels/README.md).

Prep, after the cumulative decay and the diagonal blocks (shared with the fused forward):
`gdn2_chunk_fwd_solve`, one program per (chunk, batch·head), builds the off-diagonal score blocks
and (I + T)⁻¹ and stores A_qk and the inverse in the matmul dtype; `gdn2_chunk_fwd_wy`, one
program per (chunk, batch·head, column tile), applies the inverse: U = A (w ⊙ v) on value tiles,
Y = A Ē, Q_γ and K_tail on key tiles. State and output: `gdn2_chunk_fwd_states` walks the chunks
in order with S [K, BV] in registers and stores each chunk's S₀ (matmul dtype) and the final
states; `gdn2_chunk_fwd_output`, one program per (chunk, batch·head, V tile), emits
O = Q_γ S₀ + A_qk (U − Y S₀) and, for the backward, R = U − Y S₀.

Every product has the operands and precision it has in the fused forward (the fused state pass
also rounds S to the matmul dtype before its products), so the two structures agree to float32
rounding of the accumulation order.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.chunk_fwd import (
    KeyRefs,
    _offdiag_scores,
    _offdiag_scores_by_pair,
    _store_blocks,
    chunk_cumsum,
    chunk_diag,
    key_tiles,
    merge_blocks,
    u_tile,
)
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
from pallas_kernels.state_walk import WalkRefs, part_chunks, state_pass_inputs, walk_chunks


def _invert_diag_block(t_ref, bh, r0):
    """(I + T_ii)⁻¹ of the diagonal block at rows r0.. by forward substitution, reading T's rows
    from memory (a register tile's row would cost a masked reduction per step)."""
    r = iota((SUB, SUB), 0)

    def body(i, ai):
        a = -t_ref[bh, r0 + i, :]
        a = a + jnp.sum(a[:, None] * ai, axis=0)
        return jnp.where(r == i, a[None, :], ai)

    ai = jax.lax.fori_loop(2, SUB, body, -t_ref[bh, pl.ds(r0, SUB), :])
    return ai + (r == iota((SUB, SUB), 1)).astype(F32)


def _double_diag_block(t_ref, bh, r0, precision):
    """(I + T_ii)⁻¹ by exact doubling on [16, 16] matmuls: with D the block-diagonal inverse
    at sub-block size s/2 and L the lower-left (s/2)-quadrants of every s-block of T,
    (I + T)⁻¹ at size s is D − D L D (L D L = 0), for s = 2, 4, 8, 16. Each step multiplies
    inverses of unit lower-triangular blocks: no power series, nothing that grows."""
    t = t_ref[bh, pl.ds(r0, SUB), :]
    r, c = iota((SUB, SUB), 0), iota((SUB, SUB), 1)
    d = (r == c).astype(F32)
    for level in range(1, SUB.bit_length()):  # s = 2**level
        s, half = 1 << level, 1 << (level - 1)
        quadrant = ((r >> level) == (c >> level)) & ((r & (s - 1)) >= half) & ((c & (s - 1)) < half)
        lower = jnp.where(quadrant, t, 0.0)
        d = d - mm(mm(d, lower, precision), d, precision)
    return d


def _solve_kernel(
    q_ref, k_ref, b_ref, G_ref, a_diag_ref, t_diag_ref,
    aqk_ref, ainv_ref,
    *, H, K, scale, cfg, num,
):  # fmt: skip
    c, bh = pl.program_id(0), pl.program_id(1)
    t0 = c * CHUNK
    bi, h = bh // H, bh % H
    form = _offdiag_scores_by_pair if cfg.solve_scores == "pairs" else _offdiag_scores
    scores = functools.partial(
        form, q_ref, k_ref, b_ref, G_ref, bi, h, bh, t0, K=K,
        bk=min(cfg.intra_block_k, K), scale=scale, num=num,
    )  # fmt: skip

    def diag_inverse(r0):
        if cfg.diag_inverse == "doubling":
            return _double_diag_block(t_diag_ref, bh, r0, num.solve_precision)
        return _invert_diag_block(t_diag_ref, bh, r0)

    def with_diag_scores(a_blocks):
        for i in range(NUM_SUB):
            a_blocks[(i, i)] = a_diag_ref[bh, pl.ds(t0 + SUB * i, SUB), :]
        return a_blocks

    if cfg.solve_scores in ("joint", "pairs"):
        a_blocks, t_blocks = scores(outputs=("a", "t"))
        inverse = {}
        for i in range(NUM_SUB):
            r0 = t0 + SUB * i
            a_blocks[(i, i)] = a_diag_ref[bh, pl.ds(r0, SUB), :]
            inverse[(i, i)] = diag_inverse(r0)
        _store_blocks(aqk_ref, bh, t0, a_blocks, aqk_ref.dtype)
    else:  # T's blocks and the inverse, then A_qk's: each set live alone (fewer registers)
        (t_blocks,) = scores(outputs=("t",))
        inverse = {(i, i): diag_inverse(t0 + SUB * i) for i in range(NUM_SUB)}
    inverse = merge_blocks(t_blocks, inverse, num.solve_precision)
    _store_blocks(ainv_ref, bh, t0, inverse, ainv_ref.dtype)
    if cfg.solve_scores == "apart":
        (a_blocks,) = scores(outputs=("a",))
        _store_blocks(aqk_ref, bh, t0, with_diag_scores(a_blocks), aqk_ref.dtype)


def _wy_kernel(
    q_ref, k_ref, b_ref, v_ref, w_ref, G_ref, gc_ref, ainv_ref,
    u_ref, y_ref, qg_ref, kt_ref,
    *, H, K, V, scale, block, num,
):  # fmt: skip
    c, bh, col = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bi, h = bh // H, bh % H
    rows = pl.ds(c * CHUNK, CHUNK)
    bv, bk = min(block, V), min(block, K)
    n_value_tiles = V // bv
    A = ainv_ref[bh, rows, :]

    @pl.when(col < n_value_tiles)
    def _():
        vs = pl.ds(pl.multiple_of(col * bv, bv), bv)
        u_tile(A, v_ref, w_ref, u_ref, bi, h, bh, rows, vs, num)

    @pl.when(col >= n_value_tiles)
    def _():
        ks = pl.ds(pl.multiple_of((col - n_value_tiles) * bk, bk), bk)
        key_refs = KeyRefs(
            q=q_ref, k=k_ref, b=b_ref, G=G_ref, gc=gc_ref, y=y_ref, qg=qg_ref, kt=kt_ref
        )
        key_tiles(A, key_refs, bi, h, bh, c, ks, scale=scale, num=num)


def chunk_solve(q, k, b, G, diag, *, scale, cfg: ChunkConfig, num: Numerics):
    """A_qk and (I + T)⁻¹ [BH, Tp, 64] in the matmul dtype from the diagonal blocks `diag`."""
    B, Tp, H, K = q.shape
    block = jax.ShapeDtypeStruct((B * H, Tp, CHUNK), num.mm_dtype)
    kernel = functools.partial(_solve_kernel, H=H, K=K, scale=scale, cfg=cfg, num=num)
    return pl.pallas_call(
        kernel,
        out_shape=[block, block],
        grid=(Tp // CHUNK, B * H),
        compiler_params=compiler_params(cfg.intra),
        interpret=num.interpret,
        name="gdn2_chunk_fwd_solve",
    )(q, k, b, G, *diag)


def chunk_wy_apply(q, k, v, b, w, G, gc, ainv, *, scale, cfg: ChunkConfig, num: Numerics):
    """U [BH, Tp, V], Y, Q_γ, K_tail [BH, Tp, K] in the matmul dtype."""
    B, Tp, H, K = q.shape
    V = v.shape[-1]
    dt = num.mm_dtype
    tiles = V // min(cfg.aux_block, V) + K // min(cfg.aux_block, K)
    kernel = functools.partial(_wy_kernel, H=H, K=K, V=V, scale=scale, block=cfg.aux_block, num=num)
    return pl.pallas_call(
        kernel,
        out_shape=[
            jax.ShapeDtypeStruct((B * H, Tp, V), dt),
            *(jax.ShapeDtypeStruct((B * H, Tp, K), dt) for _ in range(3)),
        ],
        grid=(Tp // CHUNK, B * H, tiles),
        compiler_params=compiler_params(cfg.wy_apply),
        interpret=num.interpret,
        name="gdn2_chunk_fwd_wy",
    )(q, k, b, v, w, G, gc, ainv)


def chunk_intra_split(q, k, v, g, b, w, *, scale, cfg: ChunkConfig, num: Numerics):
    """`chunk_fwd.chunk_intra`'s dict (G, gc, aqk, ainv, u, y, qg, kt) from four launches."""
    G, gc = chunk_cumsum(g, cfg=cfg, num=num)
    diag = chunk_diag(q, k, b, G, scale=scale, cfg=cfg, num=num)
    aqk, ainv = chunk_solve(q, k, b, G, diag, scale=scale, cfg=cfg, num=num)
    u, y, qg, kt = chunk_wy_apply(q, k, v, b, w, G, gc, ainv, scale=scale, cfg=cfg, num=num)
    return {"G": G, "gc": gc, "aqk": aqk, "ainv": ainv, "u": u, "y": y, "qg": qg, "kt": kt}


def _states_kernel(
    seq_ref, first_ref, last_ref, h0_ref, fin0_ref,
    y_ref, u_ref, kt_ref, gc_ref, s_in_ref,
    fin_ref, s0_ref,
    *, H, NT, parts, bv, num,
):  # fmt: skip
    vb, bh, part = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    vs = pl.ds(pl.multiple_of(vb * bv, bv), bv)
    del fin0_ref  # aliased to fin_ref: slots no chunk finishes keep their zeros

    def emit(c, rows, S, Rd):
        del rows, Rd  # the output launch recomputes R from the stored S₀
        s0_ref[bh, c, :, vs] = S.astype(s0_ref.dtype)

    walk_refs = WalkRefs(
        seq=seq_ref, first=first_ref, last=last_ref, h0=h0_ref,
        y=y_ref, u=u_ref, kt=kt_ref, gc=gc_ref, fin=fin_ref,
    )  # fmt: skip
    S = s_in_ref[bh, part, :, vs]
    walk_chunks(walk_refs, bh, vs, S, part_chunks(part, NT, parts), H=H, num=num, emit=emit)


def _output_kernel(s0_ref, y_ref, u_ref, qg_ref, aqk_ref, o_ref, r_ref=None, *, H, bv, num):
    """r_ref: R, an output of the residual-saving variant only (None in the other)."""
    c, bh, vb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows = pl.ds(c * CHUNK, CHUNK)
    vs = pl.ds(pl.multiple_of(vb * bv, bv), bv)
    S0 = s0_ref[bh, c, :, vs]
    R = u_ref[bh, rows, vs].astype(F32) - mm_cast(y_ref[bh, rows, :], S0, num)
    Rd = R.astype(num.mm_dtype)
    o = mm_cast(qg_ref[bh, rows, :], S0, num) + mm_cast(aqk_ref[bh, rows, :], Rd, num)
    o_ref[bh // H, rows, bh % H, vs] = o.astype(o_ref.dtype)
    if r_ref is not None:
        r_ref[bh, rows, vs] = Rd


def chunk_states(intra, h0s, segments, *, cfg: ChunkConfig, num: Numerics):
    """The state-only pass: finals [N+1, B, H, K, V] f32 and s0 [BH, NT, K, V] (matmul dtype)."""
    _, _, H, K, V = h0s.shape
    BH, Tp, _ = intra["u"].shape
    NT = Tp // CHUNK
    bv = state_tile_v(cfg.state_block_v, K, V)
    parts = state_runs(cfg.state_parts, BH * (V // bv), NT)
    names = ("y", "u", "kt", "gc")
    kernel = functools.partial(_states_kernel, H=H, NT=NT, parts=parts, bv=bv, num=num)
    return pl.pallas_call(
        kernel,
        out_shape=[
            jax.ShapeDtypeStruct(h0s.shape, F32),
            jax.ShapeDtypeStruct((BH, NT, K, V), num.mm_dtype),
        ],
        grid=(V // bv, BH, parts),
        input_output_aliases={ZEROS_INPUT: 0},
        compiler_params=compiler_params(state_pass_launch(cfg.state, K)),
        interpret=num.interpret,
        name="gdn2_chunk_fwd_states",
    )(*state_pass_inputs(intra, h0s, segments, names, parts, cfg=cfg, num=num))


def chunk_output(intra, s0, H, out_dtype, *, cfg: ChunkConfig, num: Numerics, save):
    """o [B, Tp, H, V] from each chunk's stored S₀; with `save` also R [BH, Tp, V]."""
    BH, Tp, V = intra["u"].shape
    B, K = BH // H, intra["y"].shape[-1]
    # The same clip as the state pass's tile: at K = 256 a [K, 64] S₀ tile and its [64, K]
    # operands would not fit the shared memory of one program in float32.
    bv = state_tile_v(cfg.output_block_v, K, V)
    out_shape = [jax.ShapeDtypeStruct((B, Tp, H, V), out_dtype)]
    if save:
        out_shape.append(jax.ShapeDtypeStruct((BH, Tp, V), num.mm_dtype))
    return pl.pallas_call(
        functools.partial(_output_kernel, H=H, bv=bv, num=num),
        out_shape=out_shape,
        grid=(Tp // CHUNK, BH, V // bv),
        compiler_params=compiler_params(cfg.output),
        interpret=num.interpret,
        name="gdn2_chunk_fwd_output" + ("_save" if save else ""),
    )(s0, *(intra[n] for n in ("y", "u", "qg", "aqk")))


def chunk_state_split(intra, h0s, segments, out_dtype, *, cfg: ChunkConfig, num: Numerics, save):
    """`chunk_fwd.chunk_state`'s results (o, finals and, with `save`, s0 and R) from a state-only
    pass and an output launch parallel over chunks."""
    finals, s0 = chunk_states(intra, h0s, segments, cfg=cfg, num=num)
    outs = chunk_output(intra, s0, h0s.shape[2], out_dtype, cfg=cfg, num=num, save=save)
    if save:
        return outs[0], finals, s0, outs[1]
    return outs[0], finals
