"""Public entry points: `gated_delta_rule2`, its recurrent and one-token forms, and the tied-gate
baselines (KDA, Gated DeltaNet) on the same code path."""

import jax.numpy as jnp

from gdn2_jax.ops import core, registry, values
from gdn2_jax.ops.checks import check_inputs
from gdn2_jax.ops.layout import (
    Segments,
    accum_dtype,
    stack_initial_states,
    unstack_final_states,
)
from gdn2_jax.ops.reference import l2norm, step_update

BACKENDS = registry.CHUNK.names
RECURRENT_BACKENDS = registry.RECURRENT.names


def _screen(tensors, initial_state, cu_seqlens, check_values, state_name="initial_state"):
    """`values.screen`, and the inputs with NaN gradients on the quarantined sequences."""
    quarantine = values.screen(
        dict(zip("qkvgbw", tensors, strict=True)),
        initial_state=initial_state,
        cu_seqlens=cu_seqlens,
        check_values=check_values,
        state_name=state_name,
    )
    if quarantine is None:
        return None, tensors, initial_state, cu_seqlens
    tensors, initial_state = values.guard_inputs(quarantine, tensors, initial_state)
    if quarantine.cu_seqlens is not None:
        cu_seqlens = quarantine.cu_seqlens
    return quarantine, tensors, initial_state, cu_seqlens


def _prepare(tensors, scale, initial_state, cu_seqlens, use_qk_l2norm, check_values):
    q, k, v, g, b, w = tensors
    n_states = check_inputs(q, k, v, g, b, w, initial_state=initial_state, cu_seqlens=cu_seqlens)
    quarantine, tensors, initial_state, cu_seqlens = _screen(
        tensors, initial_state, cu_seqlens, check_values
    )
    q, k, v, g, b, w = tensors
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    B, _, H, K = q.shape
    packed = cu_seqlens is not None
    dtype = accum_dtype(q)
    h0s = stack_initial_states(initial_state, n_states, (B, H, K, v.shape[-1]), packed, dtype)
    tensors = (q, k, v, g.astype(accum_dtype(g)), b, w)
    return tensors, scale, h0s, initial_state, cu_seqlens, quarantine


def _finish(o, finals, dtype, initial_state, cu_seqlens, output_final_state, quarantine):
    packed = cu_seqlens is not None
    final_state = None
    if output_final_state:
        seq_lens = jnp.diff(cu_seqlens) if packed else None
        final_state = unstack_final_states(finals, packed, initial_state, seq_lens)
    o = o.astype(dtype)
    if quarantine is not None:
        o, final_state = values.poison_outputs(quarantine, o, final_state)
    return o, final_state


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
    backend="auto",
    interpret=False,
    check_values=False,
):
    """Token-by-token recurrence; arguments and results as `gated_delta_rule2`.

    backend: "scan" (the `jax.lax.scan` reference that defines the op's semantics), "pallas" (the
    token-serial GPU kernel for decoding and short prefills; its gradient is the scan's VJP) or
    "auto" (the first of pallas, scan that supports the inputs; see `gdn2_jax.ops.registry`).
    interpret: run the Pallas kernel in Pallas interpret mode (any platform, for tests).
    """
    registry.RECURRENT.check_name(backend)
    dtype = v.dtype
    tensors, scale, h0s, initial_state, cu_seqlens, quarantine = _prepare(
        (q, k, v, g, b, w), scale, initial_state, cu_seqlens, use_qk_l2norm, check_values
    )
    q, k, v, _, b, w = tensors
    request = registry.Request.of(q, k, v, b, w, chunk_size=None, interpret=interpret)
    impl = registry.RECURRENT.select(backend, request)
    o, finals = impl.run(*tensors, h0s, cu_seqlens, scale, interpret)
    return _finish(o, finals, dtype, initial_state, cu_seqlens, output_final_state, quarantine)


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
    interpret=False,
    check_values=False,
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
      backend: "pallas" (the GPU kernels), "xla" (chunkwise WY in plain JAX), "scan" (the
        token-serial reference) or "auto": the first of pallas, xla whose `supports` accepts the
        inputs (platform, K and V, dtypes, chunk size). A backend named explicitly that cannot
        run the inputs raises NotImplementedError saying why.
      chunk_size: chunk length of the chunk backends (a power of two ≥ 16; the Pallas kernels
        support 64).
      interpret: run the Pallas kernels in Pallas interpret mode (any platform, for tests).
      check_values: under jit, also check the values through `jax.experimental.checkify` (wrap
        the caller with `checkify.checkify` and call `err.throw()`). Whatever it is, concrete
        bad values (g > 0 or NaN; NaN or inf in q, k, v, b, w or initial_state; cu_seqlens not
        from 0 to T or decreasing) raise ValueError, and traced ones give NaN outputs, final
        states and input gradients on the sequences they affect (`gdn2_jax.ops.values`).
        g = -inf is a hard reset of its channels (exp(-inf) = 0), exact on every backend.

    Returns:
      o [B, T, H, V] in v's dtype, and the final state or None.
    """
    registry.CHUNK.check_name(backend)
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two >= 16, got {chunk_size}")
    dtype = v.dtype
    tensors, scale, h0s, initial_state, cu_seqlens, quarantine = _prepare(
        (q, k, v, g, b, w), scale, initial_state, cu_seqlens, use_qk_l2norm, check_values
    )
    q, k, v, _, b, w = tensors
    request = registry.Request.of(q, k, v, b, w, chunk_size=chunk_size, interpret=interpret)
    impl = registry.CHUNK.select(backend, request)
    o, finals = impl.run(*tensors, h0s, cu_seqlens, scale, chunk_size, interpret)
    return _finish(o, finals, dtype, initial_state, cu_seqlens, output_final_state, quarantine)


def gated_delta_rule2_step(
    q_t,
    k_t,
    v_t,
    g_t,
    b_t,
    w_t,
    state,
    *,
    scale=None,
    use_qk_l2norm=False,
    backend="auto",
    interpret=False,
    check_values=False,
):
    """One decoding step: q_t, k_t, g_t, b_t [B, H, K]; v_t, w_t [B, H, V]; state [B, H, K, V].

    backend and interpret as `gated_delta_rule2_recurrent` ("pallas": the token-serial kernel,
    one fused launch; "scan": the reference update in jnp); check_values as `gated_delta_rule2`
    (a sequence is a batch row).
    Returns o_t [B, H, V] in v_t's dtype and the new float32 state.
    """
    registry.RECURRENT.check_name(backend)
    tensors = (q_t, k_t, v_t, g_t, b_t, w_t)
    check_inputs(
        *tensors, initial_state=state, cu_seqlens=None, time_axis=False, state_name="state"
    )
    quarantine, tensors, state, _ = _screen(tensors, state, None, check_values, "state")
    q_t, k_t, v_t, g_t, b_t, w_t = tensors
    if use_qk_l2norm:
        q_t, k_t = l2norm(q_t), l2norm(k_t)
    scale = q_t.shape[-1] ** -0.5 if scale is None else float(scale)
    request = registry.Request.of(q_t, k_t, v_t, b_t, w_t, chunk_size=None, interpret=interpret)
    if registry.RECURRENT.select(backend, request).name == "pallas":
        token = [x[:, None] for x in (q_t, k_t, v_t, g_t.astype(jnp.float32), b_t, w_t)]
        h0s = stack_initial_states(state, None, state.shape, False, jnp.float32)
        o, finals = core.pallas_recurrent(*token, h0s, None, scale, interpret)
        o_t, state = o[:, 0], finals[0]
    else:
        state = state.astype(accum_dtype(state))
        o_t, state = step_update(q_t, k_t, v_t, g_t, b_t, w_t, state, scale)
    o_t = o_t.astype(v_t.dtype)
    if quarantine is not None:
        o_t, state = values.poison_outputs(quarantine, o_t, state)
    return o_t, state


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
