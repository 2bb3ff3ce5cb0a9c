"""The serial state pass's walk over chunks, and its sequence split (`ChunkConfig.state_parts`).

Where B·H·(V / BV) programs cannot fill the GPU (one long sequence: 32 programs at 1x16384 for
132 SMs), each row's chunks are cut into P parts walked side by side. The recurrence is affine in
the state, S_{c+1} = M_c S_c + N_c with M_c = Diag(γ_C) − K_tailᵀ Y and N_c = K_tailᵀ U, so a
part's effect is one map: `gdn2_chunk_fwd_part_maps` walks each part from a zero state with U
(N_p, [K, V]) and from the identity without U (M_p, [K, K]; zero from a sequence start on, since
the state entering the part no longer matters there), one program per (tile of N's or M's
columns, batch·head, part). The states entering the parts follow in order, S_{p+1} = M_p S_p +
N_p (P small float32 matmuls), and the state pass then walks every part from its entering state
in parallel. The products round their operands to the matmul dtype as the serial walk's do, so
the split walk agrees with it to that rounding, not bit for bit.
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.common import F32, HIGHEST, Numerics, compiler_params, iota, mm_cast
from pallas_kernels.config import CHUNK, ChunkConfig, state_pass_launch, state_tile_v


class WalkRefs(NamedTuple):
    """The refs `walk_chunks` reads (seq, first, last [NT] int32; h0 [N+1, B, H, K, V] f32;
    y, kt [BH, Tp, K]; u [BH, Tp, V]; gc [BH, NT, K]) and writes (fin [N+1, B, H, K, V])."""

    seq: Any
    first: Any
    last: Any
    h0: Any
    y: Any
    u: Any
    kt: Any
    gc: Any
    fin: Any


def chunk_update(refs: WalkRefs, bh, c, vs, S, num, *, with_u=True):
    """One chunk of the recurrence on the state columns `vs`: R = U − Y S (−Y S without U) in
    the matmul dtype and S ← Diag(γ_C) S + K_tailᵀ R."""
    rows = pl.ds(c * CHUNK, CHUNK)
    R = -mm_cast(refs.y[bh, rows, :], S, num)
    if with_u:
        R = R + refs.u[bh, rows, vs].astype(F32)
    Rd = R.astype(num.mm_dtype)
    S = jnp.exp(refs.gc[bh, c, :])[:, None] * S + mm_cast(refs.kt[bh, rows, :], Rd, num, ta=True)
    return Rd, S


def part_chunks(part, NT: int, parts: int):
    """Chunks [start, stop) of `part` when a row's NT chunks are cut into `parts` runs."""
    length = pl.cdiv(NT, parts)
    start = part * length
    return start, jnp.minimum(start + length, NT)


def walk_chunks(refs: WalkRefs, bh, vs, S, chunks, *, H, num, emit):
    """The serial pass over chunks [start, stop) of one (V block, batch·head) from the state S
    entering them: per chunk the reset to the initial state where a sequence starts,
    `emit(c, rows, S, Rd)` (Rd: R = U − Y S in the matmul dtype), the update, and the final
    state where a sequence ends."""
    bi, h = bh // H, bh % H

    def body(c, S):
        slot = refs.seq[c]
        S = jax.lax.cond(refs.first[c] != 0, lambda: refs.h0[slot, bi, h, :, vs], lambda: S)
        S_in = S
        Rd, S = chunk_update(refs, bh, c, vs, S, num)
        emit(c, pl.ds(c * CHUNK, CHUNK), S_in, Rd)

        @pl.when(refs.last[c] != 0)
        def _():
            refs.fin[slot, bi, h, :, vs] = S

        return S

    jax.lax.fori_loop(*chunks, body, S)


def _part_maps_kernel(
    seq_ref, first_ref, h0_ref, y_ref, u_ref, kt_ref, gc_ref,
    n_ref, m_ref,
    *, H, K, V, NT, parts, bv, num,
):  # fmt: skip
    col, bh, part = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bi, h = bh // H, bh % H
    refs = WalkRefs(
        seq=seq_ref, first=first_ref, last=None, h0=h0_ref,
        y=y_ref, u=u_ref, kt=kt_ref, gc=gc_ref, fin=None,
    )  # fmt: skip
    chunks = part_chunks(part, NT, parts)
    n_value_tiles, bm = V // bv, min(bv, K)

    @pl.when(col < n_value_tiles)
    def _():
        vs = pl.ds(pl.multiple_of(col * bv, bv), bv)

        def body(c, S):
            def initial():
                return h0_ref[seq_ref[c], bi, h, :, vs]

            S = jax.lax.cond(first_ref[c] != 0, initial, lambda: S)
            return chunk_update(refs, bh, c, vs, S, num)[1]

        n_ref[bh, part, :, vs] = jax.lax.fori_loop(*chunks, body, jnp.zeros((K, bv), F32))

    @pl.when(col >= n_value_tiles)
    def _():
        m0 = (col - n_value_tiles) * bm
        ms = pl.ds(pl.multiple_of(m0, bm), bm)

        def body(c, X):
            X = jnp.where(first_ref[c] != 0, 0.0, X)
            return chunk_update(refs, bh, c, ms, X, num, with_u=False)[1]

        m_ref[bh, part, :, ms] = jax.lax.fori_loop(*chunks, body, identity_columns(K, bm, m0))


def identity_columns(K: int, bm: int, m0):
    """Columns m0 .. m0 + bm of the K x K identity, float32: where a run's M walk starts."""
    return (iota((K, bm), 0) == iota((K, bm), 1) + m0).astype(F32)


def maps_call(kernel, inputs, *, BH, parts, K, V, bv, launch, num: Numerics, name):
    """N [BH, parts, K, V] and M [BH, parts, K, K] float32 from a runs' maps `kernel`: one
    program per (tile of N's bv or M's min(bv, K) columns, batch·head, run)."""
    return pl.pallas_call(
        kernel,
        out_shape=[
            jax.ShapeDtypeStruct((BH, parts, K, V), F32),
            jax.ShapeDtypeStruct((BH, parts, K, K), F32),
        ],
        grid=(V // bv + K // min(bv, K), BH, parts),
        compiler_params=compiler_params(state_pass_launch(launch, K)),
        interpret=num.interpret,
        name=name,
    )(*inputs)


def part_maps(intra, h0s, segments, parts, *, cfg: ChunkConfig, num: Numerics):
    """N [BH, P, K, V] and M [BH, P, K, K] (float32) of each part of each row's chunks."""
    _, _, H, K, V = h0s.shape
    BH, Tp, _ = intra["u"].shape
    NT = Tp // CHUNK
    bv = state_tile_v(cfg.state_block_v, K, V)
    seq, first, _ = (x.astype(jnp.int32) for x in segments)
    kernel = functools.partial(_part_maps_kernel, H=H, K=K, V=V, NT=NT, parts=parts, bv=bv, num=num)
    inputs = (seq, first, h0s.astype(F32), *(intra[n] for n in ("y", "u", "kt", "gc")))
    return maps_call(
        kernel, inputs, BH=BH, parts=parts, K=K, V=V, bv=bv, launch=cfg.state, num=num,
        name="gdn2_chunk_fwd_part_maps",
    )  # fmt: skip


def carry_across_parts(n, m, cut, *, reverse=False):
    """The state entering each part [BH, P, K, V] from a zero one before the first part (the
    last with `reverse`, for the reverse pass): S_{p+1} = M_p S_p + N_p, or exactly N_p where
    part p resets the walk (`cut` [P]; M_p = 0 there, and 0 · NaN would carry a poisoned
    sequence's state into the next one)."""

    def step(S, part):
        n_p, m_p, cut_p = part
        carried = jnp.einsum("bij,bjv->biv", m_p, S, precision=HIGHEST)
        return jnp.where(cut_p, 0.0, carried) + n_p, S

    zero = jnp.zeros_like(n[:, 0])
    parts = (n.swapaxes(0, 1), m.swapaxes(0, 1), cut)
    _, s_in = jax.lax.scan(step, zero, parts, reverse=reverse, unroll=True)
    return s_in.swapaxes(0, 1)


def any_in_parts(flags, parts: int):
    """[parts] bool: whether any chunk of each part has its flag set (flags [NT])."""
    NT = flags.shape[0]
    length = -(-NT // parts)
    padded = jnp.zeros(parts * length, bool).at[:NT].set(flags != 0)
    return jnp.any(padded.reshape(parts, length), axis=1)


def part_states(intra, h0s, segments, parts, *, cfg: ChunkConfig, num: Numerics):
    """The state entering each of the `parts` runs of each row's chunks, [BH, parts, K, V]
    float32 (zeros when the row is one run: its first chunk starts a sequence)."""
    _, _, _, K, V = h0s.shape
    BH = intra["u"].shape[0]
    if parts == 1:
        return jnp.zeros((BH, 1, K, V), F32)
    n, m = part_maps(intra, h0s, segments, parts, cfg=cfg, num=num)
    return carry_across_parts(n, m, any_in_parts(segments[1], parts))


def state_pass_outputs(h0s, BH: int, Tp: int, out_dtype, mm_dtype, *, save: bool):
    """A forward state pass's outputs: o [B, Tp, H, V], finals shaped as h0s (float32) and, with
    `save`, each chunk's S₀ [BH, NT, K, V] and R [BH, Tp, V] in the matmul dtype."""
    _, B, H, K, V = h0s.shape
    outs = [jax.ShapeDtypeStruct((B, Tp, H, V), out_dtype), jax.ShapeDtypeStruct(h0s.shape, F32)]
    if save:
        outs += [
            jax.ShapeDtypeStruct((BH, Tp // CHUNK, K, V), mm_dtype),
            jax.ShapeDtypeStruct((BH, Tp, V), mm_dtype),
        ]
    return outs


def state_pass_inputs(intra, h0s, segments, names, parts, *, cfg: ChunkConfig, num: Numerics):
    """A forward state pass's inputs in its kernel's order: seq, first, last (int32), the
    initial states, the zeros aliased to the finals (`ZEROS_INPUT`), the intermediates `names`,
    and the state entering each of the `parts` runs."""
    seq, first, last = (x.astype(jnp.int32) for x in segments)
    s_in = part_states(intra, h0s, segments, parts, cfg=cfg, num=num)
    zeros = jnp.zeros(h0s.shape, F32)
    return (seq, first, last, h0s.astype(F32), zeros, *(intra[n] for n in names), s_in)
