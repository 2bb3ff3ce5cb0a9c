"""Input validation shared by every entry point of the op.

Errors name the argument and both shapes, so a mismatch is fixable from the message alone.
"""

import jax.numpy as jnp


def _require_float(name, x):
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must have a floating dtype, got {x.dtype}")


def _require_shape(name, x, expected, ref_name):
    if tuple(x.shape) != tuple(expected):
        raise ValueError(
            f"{name} has shape {tuple(x.shape)}, expected {tuple(expected)} (from {ref_name})"
        )


def check_inputs(
    q, k, v, g, b, w, *, initial_state, cu_seqlens, time_axis=True, state_name="initial_state"
):
    """Validates the [B, T, H, K] / [B, T, H, V] family (or [B, H, K] without time_axis).

    Returns the number of state slots N: B, or the number of packed sequences.
    """
    rank = 4 if time_axis else 3
    layout = "[B, T, H, K]" if time_axis else "[B, H, K]"
    for name, x in zip("qkvgbw", (q, k, v, g, b, w), strict=True):
        if x.ndim != rank:
            raise ValueError(f"{name} must be {layout}-shaped, got shape {tuple(x.shape)}")
        _require_float(name, x)
    _require_shape("k", k, q.shape, "q")
    _require_shape("g", g, q.shape, "q")
    _require_shape("b", b, q.shape, "q")
    _require_shape("v", v, (*q.shape[:-1], v.shape[-1]), "q's leading dims")
    _require_shape("w", w, v.shape, "v")

    n_states = q.shape[0]
    if cu_seqlens is not None:
        n_states = check_cu_seqlens(cu_seqlens, batch=q.shape[0])
    if initial_state is not None:
        heads, key_dim, value_dim = q.shape[-2], q.shape[-1], v.shape[-1]
        _require_float(state_name, initial_state)
        _require_shape(
            state_name,
            initial_state,
            (n_states, heads, key_dim, value_dim),
            "[N, H, K, V] with N = " + ("number of sequences" if cu_seqlens is not None else "B"),
        )
    return n_states


def check_cu_seqlens(cu_seqlens, *, batch):
    """cu_seqlens is int [N+1] and needs B == 1; its values are checked in `values`."""
    if batch != 1:
        raise ValueError(f"cu_seqlens requires batch size 1 (packed sequences), got B={batch}")
    if cu_seqlens.ndim != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must be 1-D with N+1 >= 2 entries, got {cu_seqlens.shape}")
    if not jnp.issubdtype(cu_seqlens.dtype, jnp.integer):
        raise ValueError(f"cu_seqlens must have an integer dtype, got {cu_seqlens.dtype}")
    return cu_seqlens.shape[0] - 1
