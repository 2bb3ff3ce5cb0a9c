"""Public entry points: `gated_delta_rule2`, its recurrent and one-token forms, and the tied-gate
baselines (KDA, Gated DeltaNet) on the same code path."""

import jax.numpy as jnp

from gdn2_jax.ops import core
from gdn2_jax.ops.checks import check_inputs
from gdn2_jax.ops.layout import (
    Segments,
    accum_dtype,
    dense_segments,
    packed_segments,
    stack_initial_states,
    unstack_final_states,
)
from gdn2_jax.ops.reference import l2norm, step_update

BACKENDS = ("auto", "pallas", "xla", "scan")
RECURRENT_BACKENDS = ("auto", "pallas", "scan")


def _resolve_recurrent(backend):
    if backend not in RECURRENT_BACKENDS:
        raise ValueError(f"backend must be one of {RECURRENT_BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "pallas" if core.default_backend() == "pallas" else "scan"
    return backend


def _prepare(q, k, v, g, b, w, scale, initial_state, cu_seqlens, use_qk_l2norm):
    n_states = check_inputs(q, k, v, g, b, w, initial_state=initial_state, cu_seqlens=cu_seqlens)
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    B, _, H, K = q.shape
    packed = cu_seqlens is not None
    dtype = accum_dtype(q)
    h0s = stack_initial_states(initial_state, n_states, (B, H, K, v.shape[-1]), packed, dtype)
    return q, k, g.astype(accum_dtype(g)), scale, h0s, packed


def _finish(o, finals, dtype, packed, initial_state, cu_seqlens, output_final_state):
    if not output_final_state:
        return o.astype(dtype), None
    seq_lens = jnp.diff(cu_seqlens) if packed else None
    return o.astype(dtype), unstack_final_states(finals, packed, initial_state, seq_lens)


def gated_delta_rule2_recurrent(
    q,
    k,
    v,
    g,
    b,
    w,
    *,
    scale=None,
    initial_state=None,
    output_final_state=False,
    cu_seqlens=None,
    use_qk_l2norm=False,
    backend="scan",
):
    """Token-by-token recurrence; arguments and results as `gated_delta_rule2`.

    backend: "scan" (the `jax.lax.scan` reference that defines the op's semantics), "pallas" (the
    token-serial GPU kernel for decoding and short prefills; its gradient is the scan's VJP) or
    "auto" (pallas on a GPU, scan elsewhere).
    """
    backend = _resolve_recurrent(backend)
    dtype = v.dtype
    q, k, g, scale, h0s, packed = _prepare(
        q, k, v, g, b, w, scale, initial_state, cu_seqlens, use_qk_l2norm
    )
    run = core.pallas_recurrent if backend == "pallas" else core.scan_recurrent
    o, finals = run(q, k, v, g, b, w, h0s, cu_seqlens, scale)
    return _finish(o, finals, dtype, packed, initial_state, cu_seqlens, output_final_state)


def _chunk_layout(xs, cu_seqlens, chunk_size):
    """Pads (dense) or re-aligns (packed) the token axis so every sequence starts a chunk.

    Returns the padded arrays, the chunk segments, and a function mapping padded outputs back.
    """
    T = xs[0].shape[1]
    if cu_seqlens is None:
        num_chunks = -(-T // chunk_size)
        pad = num_chunks * chunk_size - T
        padded = [jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in xs]
        return padded, dense_segments(num_chunks), lambda o: o[:, :T]

    n = cu_seqlens.shape[0] - 1
    cu = cu_seqlens.astype(jnp.int32)
    chunks_per_seq = -(-jnp.diff(cu) // chunk_size)
    chunk_bounds = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(chunks_per_seq)])
    # Each sequence wastes under one chunk of padding, so this bound is static and sufficient.
    num_chunks = -(-(T + n * (chunk_size - 1)) // chunk_size)
    token = jnp.arange(T)
    seq = jnp.clip(jnp.searchsorted(cu[1:], token, side="right"), 0, n - 1)
    dest = chunk_bounds[seq] * chunk_size + token - cu[seq]
    Tp = num_chunks * chunk_size
    padded = [jnp.zeros((1, Tp, *x.shape[2:]), x.dtype).at[:, dest].set(x) for x in xs]
    return padded, packed_segments(chunk_bounds, num_chunks), lambda o: o[:, dest]


def _resolve_core(backend):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = core.default_backend()
    return {"pallas": core.pallas_chunk_core, "xla": core.xla_chunk_core}.get(backend)


def gated_delta_rule2(
    q,
    k,
    v,
    g,
    b,
    w,
    *,
    scale=None,
    initial_state=None,
    output_final_state=False,
    cu_seqlens=None,
    use_qk_l2norm=False,
    backend="auto",
    chunk_size=64,
):
    """Gated Delta Rule-2 over a sequence.

    Args:
      q, k, g, b: [B, T, H, K]; v, w: [B, T, H, V]. g ≤ 0 is the log-decay (computed in float32),
        b the erase gate ([0, 1], or [0, 2] with negative eigenvalues), w the write gate.
      scale: query scale, default K**-0.5.
      initial_state: [N, H, K, V] float32, N = B or the number of packed sequences.
      output_final_state: return the [N, H, K, V] float32 final state (else None).
      cu_seqlens: int [N+1] cumulative lengths of packed sequences (B must be 1); the state resets
        at every boundary. Equal neighbours (empty sequences) are allowed, so a fixed-size
        cu_seqlens can describe a varying number of documents.
      use_qk_l2norm: L2-normalize q and k per head inside the op.
      backend: "auto" (pallas on GPU, xla elsewhere), "pallas", "xla" (chunkwise WY in plain JAX)
        or "scan" (token-serial reference).
      chunk_size: chunk length of the chunk backends (a power of two ≥ 16).

    Returns:
      o [B, T, H, V] in v's dtype, and the final state or None.
    """
    core_fn = _resolve_core(backend)
    if core_fn is None:
        return gated_delta_rule2_recurrent(
            q,
            k,
            v,
            g,
            b,
            w,
            scale=scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
            cu_seqlens=cu_seqlens,
            use_qk_l2norm=use_qk_l2norm,
        )
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two >= 16, got {chunk_size}")
    dtype = v.dtype
    q, k, g, scale, h0s, packed = _prepare(
        q, k, v, g, b, w, scale, initial_state, cu_seqlens, use_qk_l2norm
    )
    padded, segments, unpad = _chunk_layout((q, k, v, g, b, w), cu_seqlens, chunk_size)
    o, finals = core_fn(*padded, h0s, segments, scale, chunk_size)
    return _finish(unpad(o), finals, dtype, packed, initial_state, cu_seqlens, output_final_state)


def gated_delta_rule2_step(
    q_t, k_t, v_t, g_t, b_t, w_t, state, *, scale=None, use_qk_l2norm=False, backend="auto"
):
    """One decoding step: q_t, k_t, g_t, b_t [B, H, K]; v_t, w_t [B, H, V]; state [B, H, K, V].

    backend: "scan" (the reference update in jnp), "pallas" (the token-serial kernel, one fused
    launch) or "auto" (pallas on a GPU, the jnp update elsewhere).
    Returns o_t [B, H, V] in v_t's dtype and the new float32 state.
    """
    backend = _resolve_recurrent(backend)
    check_inputs(
        q_t,
        k_t,
        v_t,
        g_t,
        b_t,
        w_t,
        initial_state=state,
        cu_seqlens=None,
        time_axis=False,
        state_name="state",
    )
    if use_qk_l2norm:
        q_t, k_t = l2norm(q_t), l2norm(k_t)
    scale = q_t.shape[-1] ** -0.5 if scale is None else float(scale)
    if backend == "pallas":
        token = [x[:, None] for x in (q_t, k_t, v_t, g_t, b_t, w_t)]
        h0s = stack_initial_states(state, None, state.shape, False, jnp.float32)
        o, finals = core.pallas_recurrent(*token, h0s, None, scale)
        return o[:, 0].astype(v_t.dtype), finals[0]
    o_t, state = step_update(q_t, k_t, v_t, g_t, b_t, w_t, state.astype(accum_dtype(state)), scale)
    return o_t.astype(v_t.dtype), state


def _tied(beta, key_dim, value_dim):
    beta = beta.astype(jnp.float32)[..., None]
    shape = beta.shape[:-1]
    return jnp.broadcast_to(beta, (*shape, key_dim)), jnp.broadcast_to(beta, (*shape, value_dim))


def kda(q, k, v, g, beta, **kwargs):
    """Kimi Delta Attention: GDN-2 with b = w = β (beta [B, T, H]) on the same code path."""
    if beta.shape != q.shape[:-1]:
        raise ValueError(f"beta has shape {beta.shape}, expected {q.shape[:-1]} ([B, T, H])")
    b, w = _tied(beta, q.shape[-1], v.shape[-1])
    return gated_delta_rule2(q, k, v, g, b.astype(q.dtype), w.astype(v.dtype), **kwargs)


def gated_delta_rule(q, k, v, g, beta, **kwargs):
    """Gated DeltaNet: KDA with one log-decay per head (g [B, T, H]) broadcast over keys."""
    if g.shape != q.shape[:-1]:
        raise ValueError(f"g has shape {g.shape}, expected {q.shape[:-1]} ([B, T, H])")
    g = jnp.broadcast_to(g.astype(jnp.float32)[..., None], q.shape)
    return kda(q, k, v, g, beta, **kwargs)


__all__ = [
    "BACKENDS",
    "RECURRENT_BACKENDS",
    "Segments",
    "gated_delta_rule",
    "gated_delta_rule2",
    "gated_delta_rule2_recurrent",
    "gated_delta_rule2_step",
    "kda",
]
