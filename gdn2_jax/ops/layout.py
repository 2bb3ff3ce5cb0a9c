"""Sequence layout: which state slot each unit (token or chunk) belongs to.

Both the token-serial reference and the chunk algorithms walk a sequence of units that carries
one recurrent state. `Segments` says, per unit, which state slot it belongs to, whether the state
resets to that slot's initial state before the unit, and whether the unit is the slot's last (its
state after the unit is the slot's final state). Dense batches have one slot covering every unit;
packed sequences (cu_seqlens) have one slot per sequence. An extra all-zero slot N absorbs units
that belong to no sequence (chunk padding past the last sequence).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Segments(NamedTuple):
    seq: jax.Array  # int32 [U]: state slot of each unit, in [0, N]
    first: jax.Array  # bool [U]: reset the state to the slot's initial state before this unit
    last: jax.Array  # bool [U]: the state after this unit is the slot's final state


def dense_segments(num_units):
    """One slot (0) that starts at unit 0 and ends at the last unit."""
    units = jnp.arange(num_units)
    return Segments(
        seq=jnp.zeros(num_units, jnp.int32), first=units == 0, last=units == num_units - 1
    )


def packed_segments(bounds, num_units):
    """Slots given by unit boundaries `bounds` (int [N+1], non-decreasing, from 0)."""
    units = jnp.arange(num_units)
    n = bounds.shape[0] - 1
    seq = jnp.searchsorted(bounds[1:], units, side="right").astype(jnp.int32)
    in_seq = seq < n
    start = bounds[jnp.minimum(seq, n - 1)]
    end = bounds[jnp.minimum(seq, n - 1) + 1]
    # Units past the last sequence belong to the zero slot N and reset into it each time.
    return Segments(
        seq=seq,
        first=jnp.where(in_seq, units == start, True),
        last=in_seq & (units == end - 1),
    )


def accum_dtype(x):
    """float32, or float64 for float64 inputs (x64 mode, for tight gradient checks)."""
    return jnp.promote_types(jnp.float32, x.dtype)


def stack_initial_states(initial_state, n_slots, shape, packed, dtype):
    """Initial states as [N+1, B, H, K, V] in `dtype`, the extra slot N being zeros."""
    if initial_state is None:
        return jnp.zeros((n_slots + 1, *shape), dtype)
    h0 = initial_state.astype(dtype)
    h0 = h0[:, None] if packed else h0[None]
    return jnp.concatenate([h0, jnp.zeros_like(h0[:1])], axis=0)


def unstack_final_states(finals, packed, initial_state, seq_lens):
    """[N+1, B, H, K, V] -> [N, H, K, V]; an empty sequence's final state is its initial state."""
    finals = finals[:-1, 0] if packed else finals[0]
    if packed and initial_state is not None:
        empty = (seq_lens == 0)[:, None, None, None]
        finals = jnp.where(empty, initial_state.astype(finals.dtype), finals)
    return finals


def chunk_layout(xs, cu_seqlens, chunk_size):
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
