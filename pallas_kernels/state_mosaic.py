"""The forward state pass in Pallas Mosaic GPU (Hopper): `ChunkConfig(state_lowering="mosaic")`.

Same contract and roundings as `chunk_fwd.chunk_state` (the Triton walk). One program, one
warpgroup, per (V block, batch·head, run of chunks) carries the float32 state tile S [K, BV] in
registers in the wgmma accumulator layout; each chunk's tiles of Y, U, K_tail, Q_γ, A_qk and γ
arrive by TMA `stages` chunks ahead (`plgpu.emit_pipeline`). Per chunk, on the tensor cores
(16-bit operands in shared memory, float32 accumulation):

    S_b = S in the matmul dtype         (shared memory: the products' operand, and S₀ when saved)
    R = U − Y S_b, R_b in the matmul dtype              (shared memory: operand, and R when saved)
    O = Q_γ S_b + A_qk R_b
    S ← Diag(γ_C) S + K_tailᵀ R_b                       (K_tail read transposed from shared memory)

Where a sequence starts, S is its initial state (TMA into shared memory); where one ends, S goes
out the same way. Outputs leave by TMA from double-buffered tiles, so a chunk's stores overlap
the next chunk's products. Slots no chunk finishes (the padding slot, empty sequences) are zeros.

Hopper only; 16-bit inputs (wgmma has no IEEE float32) and K in (64, 128): the state tile's K
rows are wgmma's M, a multiple of 64, and a [256, BV] tile with its operands does not fit a
warpgroup's registers. `interpret=True` runs it under Pallas's Mosaic GPU interpreter on CPU.
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.common import F32, Numerics
from pallas_kernels.config import CHUNK, ChunkConfig, state_runs, state_tile_v
from pallas_kernels.state_walk import part_chunks, part_states, state_pass_outputs

MOSAIC_STATE_K = (64, 128)
MIN_BLOCK_V = 32  # wgmma's N; narrower V tiles would also need narrower swizzles
# An H100 / H200 block's shared memory, and Mosaic GPU's alignment of every allocation in it.
SHARED_PER_BLOCK = 232_448
SHARED_ALIGNMENT = 1024
NAMES = ("y", "u", "kt", "qg", "aqk", "gc")


def _aligned(nbytes: int) -> int:
    return -(-nbytes // SHARED_ALIGNMENT) * SHARED_ALIGNMENT


def shared_bytes(K: int, bv: int, stages: int, itemsize: int = 2) -> int:
    """Shared memory of one program: `stages` of each pipelined input, the float32 state tile
    for initial and final states, and two buffers each of S_b, R_b and O."""
    per_chunk = [CHUNK * K * itemsize] * 3 + [CHUNK * bv * itemsize, CHUNK * CHUNK * itemsize]
    pipelined = sum(_aligned(stages * b) for b in [*per_chunk, K * 4, 4 * 4])
    scratch = _aligned(K * bv * 4) + _aligned(2 * K * bv * itemsize)
    return pipelined + scratch + 2 * _aligned(2 * CHUNK * bv * itemsize)


def mosaic_state_unsupported(K: int, V: int, dtype, cfg: ChunkConfig) -> str | None:
    """Why the Mosaic GPU state pass cannot run these inputs (None when it can)."""
    if jnp.dtype(dtype).itemsize != 2:
        return f"state_lowering='mosaic' runs 16-bit inputs (wgmma), got {jnp.dtype(dtype)}"
    if K not in MOSAIC_STATE_K:
        return f"state_lowering='mosaic' supports K in {MOSAIC_STATE_K}, got K={K}"
    bv = state_tile_v(cfg.state_block_v, K, V)
    if bv < MIN_BLOCK_V:
        return f"state_lowering='mosaic' needs V tiles >= {MIN_BLOCK_V} columns, got {bv}"
    need = shared_bytes(K, bv, cfg.state.num_stages)
    if need > SHARED_PER_BLOCK:
        return (
            f"state_lowering='mosaic' at K={K}, {bv} state columns and "
            f"{cfg.state.num_stages} stages needs {need} B of shared memory > {SHARED_PER_BLOCK}"
        )
    return None


def _transforms(dtype, minor: int):
    """The tiling and swizzle TMA and wgmma want for a tile whose minor dimension is `minor`."""
    swizzle = plgpu.find_swizzle(minor * jnp.dtype(dtype).itemsize * 8)
    tile = swizzle // jnp.dtype(dtype).itemsize
    return (plgpu.TilingTransform((8, tile)), plgpu.SwizzleTransform(swizzle))


def _smem(shape, dtype):
    return plgpu.SMEM(shape, dtype, transforms=_transforms(dtype, shape[-1]))


class _Refs(NamedTuple):
    """The pass's GMEM refs; s0 and r only in the residual-saving variant."""

    seg: Any  # [NT, 4] int32: seq, first, last, 0 per chunk
    h0: Any
    y: Any
    u: Any
    kt: Any
    qg: Any
    aqk: Any
    gc: Any
    s_in: Any
    o: Any
    fin: Any
    s0: Any = None
    r: Any = None


class _Scratch(NamedTuple):
    state: Any  # [K, BV] float32: initial and final states pass through it
    barrier: Any
    s: Any  # [2, K, BV]: S_b of even and odd chunks
    r: Any  # [2, 64, BV]
    o: Any  # [2, 64, BV]


def _product(*pairs, shape):
    """Σ a @ b over `pairs` on the tensor cores, float32, returned in registers."""

    def run(acc):
        for a, b in pairs:
            plgpu.wgmma(acc, a, b)
        return acc[...]

    return pl.run_scoped(run, plgpu.ACC(shape, F32))


def _load_state(ref, scratch: _Scratch):
    plgpu.copy_gmem_to_smem(ref, scratch.state, scratch.barrier)
    plgpu.barrier_wait(scratch.barrier)
    return plgpu.load(scratch.state, (), layout=plgpu.Layout.WGMMA)


def _chunk(refs: _Refs, scratch: _Scratch, where, c, slot, tiles, S):
    """One chunk: the reset, the products, the stores; returns the state after the chunk."""
    bi, h, bh, vs = where
    seg, y, u, kt, qg, aqk, gc = tiles
    seq, first, last = seg[0], seg[1], seg[2]
    S = jax.lax.cond(
        first != 0, lambda: _load_state(refs.h0.at[seq, bi, h, :, vs], scratch), lambda: S
    )
    s_b, r_b, o_b = scratch.s.at[slot], scratch.r.at[slot], scratch.o.at[slot]
    # This slot's stores of two chunks ago must have read it (the last chunk's may still run).
    plgpu.wait_smem_to_gmem(1, wait_read_only=True)
    s_b[...] = S.astype(s_b.dtype)
    plgpu.commit_smem()
    bv = S.shape[1]
    R = plgpu.load(u, (), layout=plgpu.Layout.WGMMA).astype(F32)
    R = R - _product((y, s_b), shape=(CHUNK, bv))
    r_b[...] = R.astype(r_b.dtype)
    plgpu.commit_smem()
    o = _product((qg, s_b), (aqk, r_b), shape=(CHUNK, bv))
    gamma = jnp.exp(plgpu.load(gc, (), layout=plgpu.Layout.WGMMA.reduce(1)))
    S = S * jax.lax.broadcast_in_dim(gamma, S.shape, [0])
    S = S + _product((kt.T, r_b), shape=S.shape)
    o_b[...] = o.astype(o_b.dtype)
    plgpu.commit_smem()
    rows = pl.ds(c * CHUNK, CHUNK)
    plgpu.copy_smem_to_gmem(o_b, refs.o.at[bi, rows, h, vs], commit_group=False)
    if refs.s0 is not None:
        plgpu.copy_smem_to_gmem(s_b, refs.s0.at[bh, c, :, vs], commit_group=False)
        plgpu.copy_smem_to_gmem(r_b, refs.r.at[bh, rows, vs], commit_group=False)
    plgpu.commit_smem_to_gmem_group()

    @pl.when(last != 0)
    def _():
        scratch.state[...] = S
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(scratch.state, refs.fin.at[seq, bi, h, :, vs])
        plgpu.wait_smem_to_gmem(0)

    return S


def _walk(refs: _Refs, scratch: _Scratch, *, H, K, bv, NT, parts, stages):
    vb, bh, part = (jax.lax.axis_index(n) for n in ("v", "bh", "part"))
    bi, h = bh // H, bh % H
    vs = pl.ds(vb * bv, bv)
    start, stop = part_chunks(part, NT, parts)

    def body(idx, *tiles_and_state):
        *tiles, S = tiles_and_state
        (i,) = idx
        return _chunk(refs, scratch, (bi, h, bh, vs), start + i, i % 2, tiles, S)

    def tile(width, col=0):
        """Chunk i's [64, width] tile of a per-head array, column block `col`."""
        return plgpu.BlockSpec(
            (None, CHUNK, width),
            lambda i: (bh, start + i, col),
            transforms=_transforms(refs.y.dtype, width),
        )

    specs = [
        plgpu.BlockSpec((None, 4), lambda i: (start + i, 0)),
        tile(K),
        tile(bv, col=vb),
        tile(K),
        tile(K),
        tile(CHUNK),
        plgpu.BlockSpec((None, None, K), lambda i: (bh, start + i, 0)),
    ]
    S = _load_state(refs.s_in.at[bh, part, :, vs], scratch)
    pipeline = plgpu.emit_pipeline(
        body,
        grid=(jnp.maximum(stop - start, 0),),
        in_specs=specs,
        max_concurrent_steps=stages,
        init_carry=S,
    )
    pipeline(refs.seg, *(getattr(refs, n) for n in NAMES))
    plgpu.wait_smem_to_gmem(0)


def _kernel(*refs, state, barrier, s, r, o, **static):
    """plgpu.kernel's body: the flat GMEM refs (inputs, then outputs) and the named scratch."""
    _walk(_Refs(*refs), _Scratch(state, barrier, s, r, o), **static)


def _segments_table(segments):
    seq, first, last = (x.astype(jnp.int32) for x in segments)
    return jnp.stack([seq, first, last, jnp.zeros_like(seq)], axis=1)


def chunk_state_mosaic(intra, h0s, segments, out_dtype, *, cfg: ChunkConfig, num: Numerics, save):
    """`chunk_fwd.chunk_state` as one Mosaic GPU kernel: o [B, Tp, H, V], finals [N+1, B, H, K,
    V] float32 and, with `save`, each chunk's S₀ [BH, NT, K, V] and R [BH, Tp, V]."""
    _, _, H, K, V = h0s.shape
    BH, Tp, _ = intra["u"].shape
    NT = Tp // CHUNK
    reason = mosaic_state_unsupported(K, V, num.mm_dtype, cfg)
    if reason is not None:
        raise NotImplementedError(reason)
    bv = state_tile_v(cfg.state_block_v, K, V)
    parts = state_runs(cfg.state_parts, BH * (V // bv), NT)
    out_type = state_pass_outputs(h0s, BH, Tp, out_dtype, num.mm_dtype, save=save)
    static = dict(H=H, K=K, bv=bv, NT=NT, parts=parts, stages=cfg.state.num_stages)
    mm = num.mm_dtype
    outs = plgpu.kernel(
        functools.partial(_kernel, **static),
        out_type=out_type,
        scratch_types=dict(
            state=_smem((K, bv), F32),
            barrier=plgpu.Barrier(num_arrivals=1),
            s=_smem((2, K, bv), mm),
            r=_smem((2, CHUNK, bv), mm),
            o=_smem((2, CHUNK, bv), out_dtype),
        ),
        grid=(V // bv, BH, parts),
        grid_names=("v", "bh", "part"),
        # No cross-warp reductions: the 2 KB Pallas reserves for them by default would not fit.
        compiler_params=plgpu.CompilerParams(reduction_scratch_bytes=0),
        interpret=plgpu.InterpretGPUParams() if num.interpret else False,
        kernel_name="gdn2_chunk_fwd_state_mosaic" + ("_save" if save else ""),
    )(
        _segments_table(segments),
        h0s.astype(F32),
        *(intra[n] for n in NAMES),
        part_states(intra, h0s, segments, parts, cfg=cfg, num=num),
    )
    seq, _, last = segments
    finished = jnp.zeros(h0s.shape[0], bool).at[seq].max(last != 0)
    fin = jnp.where(finished[:, None, None, None, None], outs[1], 0.0)
    return (outs[0], fin, *outs[2:])
