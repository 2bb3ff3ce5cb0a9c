"""Token-serial recurrent kernel for decoding (paper C.5): the step function and short prefills.

One program per (V block, sequence, head) keeps its state tile S [K, BV] in float32 registers and
applies Eq. 29 token by token: S ← exp(g_t) ⊙ S; S ← S + k_t (w_t ⊙ v_t − Sᵀ(b_t ⊙ k_t))ᵀ;
o_t = Sᵀ(scale·q_t); g_t = −inf (a hard reset) is exact as it is, exp(−inf) = 0. Forward only
(training uses the chunk kernels). Packed sequences (cu_seqlens, B = 1) give each program its own
token range; the state starts from that sequence's initial state.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.common import F32, compiler_params, dims_unsupported, dtypes_unsupported
from pallas_kernels.config import DEFAULT_RECURRENT_CONFIG, RecurrentConfig, state_tile_v


def _recurrent_kernel(
    cu_ref, q_ref, k_ref, v_ref, g_ref, b_ref, w_ref, h0_ref,
    o_ref, fin_ref,
    *, H, T, bv, scale, packed,
):  # fmt: skip
    vb, nh = pl.program_id(0), pl.program_id(1)
    n, h = nh // H, nh % H
    vs = pl.ds(pl.multiple_of(vb * bv, bv), bv)
    bi = 0 if packed else n
    start, stop = (cu_ref[n], cu_ref[n + 1]) if packed else (0, T)

    def body(t, S):
        k = k_ref[bi, t, h, :].astype(F32)
        v = v_ref[bi, t, h, vs].astype(F32)
        S = jnp.exp(g_ref[bi, t, h, :].astype(F32))[:, None] * S
        erase = jnp.sum((b_ref[bi, t, h, :].astype(F32) * k)[:, None] * S, axis=0)
        S = S + k[:, None] * (w_ref[bi, t, h, vs].astype(F32) * v - erase)[None, :]
        q = q_ref[bi, t, h, :].astype(F32) * scale
        o_ref[bi, t, h, vs] = jnp.sum(q[:, None] * S, axis=0).astype(o_ref.dtype)
        return S

    fin_ref[n, h, :, vs] = jax.lax.fori_loop(start, stop, body, h0_ref[n, h, :, vs])


def recurrent_unsupported(K, V, dtypes, chunk_size=None):
    """Why the token-serial kernel cannot run these inputs (None when it can)."""
    del chunk_size  # token-serial: no chunks
    return dims_unsupported(K, V) or dtypes_unsupported(dtypes)


def recurrent(
    q,
    k,
    v,
    g,
    b,
    w,
    initial_state=None,
    *,
    scale=None,
    cu_seqlens=None,
    cfg: RecurrentConfig = DEFAULT_RECURRENT_CONFIG,
    interpret: bool = False,
):
    """o [B, T, H, V] in v's dtype and final states [N, H, K, V] float32.

    Shapes as `gated_delta_rule2` (inputs are validated there); initial_state [N, H, K, V] or None.
    Tokens outside every packed sequence get o = 0. `interpret`: Pallas interpret mode.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    reason = recurrent_unsupported(K, V, (q.dtype, k.dtype, v.dtype, b.dtype, w.dtype), None)
    if reason is not None:
        raise NotImplementedError(reason)
    cfg.check_dims(K, V)
    packed = cu_seqlens is not None
    N = cu_seqlens.shape[0] - 1 if packed else B
    scale = K**-0.5 if scale is None else float(scale)
    h0 = jnp.zeros((N, H, K, V), F32) if initial_state is None else initial_state.astype(F32)
    cu = jnp.zeros((2,), jnp.int32) if not packed else cu_seqlens.astype(jnp.int32)
    bv = state_tile_v(cfg.block_v, K, V)
    kernel = functools.partial(_recurrent_kernel, H=H, T=T, bv=bv, scale=scale, packed=packed)
    o, final = pl.pallas_call(
        kernel,
        out_shape=[
            jax.ShapeDtypeStruct(v.shape, v.dtype),
            jax.ShapeDtypeStruct((N, H, K, V), F32),
        ],
        grid=(V // bv, N * H),
        compiler_params=compiler_params(cfg.launch),
        interpret=interpret,
        name="gdn2_recurrent_fwd",
    )(cu, q, k, v, g.astype(F32), b, w, h0)
    if packed:
        # Tokens no sequence covers were never written.
        covered = jnp.arange(T) < cu_seqlens[-1]
        o = jnp.where(covered[None, :, None, None], o, 0)
    return o, final
