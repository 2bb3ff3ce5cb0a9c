"""Context parallelism for the token mixers around the GDN-2 op: what each device needs from
the devices holding earlier tokens of its sequence.

Call inside `jax.shard_map` with the token axis split evenly over `axis_name`: device d holds global
tokens d·T_local … (d+1)·T_local − 1. Each helper returns exactly what the single-device module
returns for this span of the whole sequence.

  * Short convolution (kernel W): the previous W−1 inputs (and their documents) as the conv's
    state — a halo, zeros before token 0.
  * Sliding-window attention (window W): the previous W−1 rotated keys and values, with the mask
    built from global positions.
  * Full causal attention: every device's keys and values (all_gather), masked by global position.
  * Packed documents (segment ids): the GDN-2 layer's state reset at document starts needs the
    previous token's document, which `segment_starts` reads across the device boundary.
"""

import math

import jax
import jax.numpy as jnp

from gdn2_jax.layers.attention import Attention
from gdn2_jax.layers.conv import ShortConvolution


def span_positions(T_local, axis_name):
    """Global positions [T_local] of this device's tokens."""
    return jax.lax.axis_index(axis_name) * T_local + jnp.arange(T_local)


def previous_tokens(x, n, axis_name):
    """The n tokens before this device's span: x [B, T_local, ...] -> [B, n, ...].

    Taken from as many earlier devices as n needs (⌈n / T_local⌉ ppermutes, one per distance), so a
    window longer than a span works too. Tokens before global token 0 are zeros.
    """
    T = x.shape[1]
    size = jax.lax.axis_size(axis_name)
    blocks = []
    for hop in range(math.ceil(n / T), 0, -1):
        if hop >= size:
            blocks.append(jnp.zeros_like(x))
        else:
            perm = [(i, i + hop) for i in range(size - hop)]
            blocks.append(jax.lax.ppermute(x, axis_name, perm))
    return jnp.concatenate(blocks, axis=1)[:, -n:]


def short_conv(conv: ShortConvolution, x, *, axis_name="context", segment_ids=None):
    """`conv(x, segment_ids=...)` on this span: x [B, T_local, D] -> (y, the conv's new state).

    The previous W−1 inputs become the conv's state, with their documents so that a document
    continuing from the previous device reads them and a new one does not. Before token 0 the halo
    is zeros, which is the conv's own zero state, so its documents do not matter there.
    """
    W = conv.kernel_size
    if W == 1:
        return conv(x, segment_ids=segment_ids)
    halo = previous_tokens(x, W - 1, axis_name)
    halo_ids = None if segment_ids is None else previous_tokens(segment_ids, W - 1, axis_name)
    return conv(x, segment_ids=segment_ids, state=halo, state_segment_ids=halo_ids)


def segment_starts(segment_ids, axis_name="context"):
    """[B, T_local] bool: the token opens a document (its id differs from the previous global
    token's, or it is global token 0) — where the GDN-2 layer resets its state."""
    previous = jnp.concatenate(
        [previous_tokens(segment_ids, 1, axis_name), segment_ids[:, :-1]], axis=1
    )
    first = span_positions(segment_ids.shape[1], axis_name) == 0
    return (segment_ids != previous) | first


def _window_keys(k, v, positions, segment_ids, window_size, axis_name):
    """The previous W−1 keys/values (positions, documents) followed by this span's own."""
    n = window_size - 1
    if n == 0:
        return k, v, positions, segment_ids
    k = jnp.concatenate([previous_tokens(k, n, axis_name), k], axis=1)
    v = jnp.concatenate([previous_tokens(v, n, axis_name), v], axis=1)
    positions = jnp.concatenate([positions[0] - n + jnp.arange(n), positions])  # < 0: no token
    if segment_ids is not None:
        ids = previous_tokens(segment_ids, n, axis_name)
        segment_ids = jnp.concatenate([ids, segment_ids], axis=1)
    return k, v, positions, segment_ids


def _all_keys(k, v, segment_ids, axis_name):
    """Every device's keys/values (and documents) in global token order."""
    k, v = (jax.lax.all_gather(x, axis_name, axis=1, tiled=True) for x in (k, v))
    if segment_ids is not None:
        segment_ids = jax.lax.all_gather(segment_ids, axis_name, axis=1, tiled=True)
    return k, v, jnp.arange(k.shape[1]), segment_ids


def attention(attn: Attention, x, *, axis_name="context", segment_ids=None):
    """`attn(x, segment_ids=...)` on this span: x [B, T_local, hidden] -> [B, T_local, hidden].

    Queries and keys are rotated at their global positions. A sliding window takes a halo of the
    previous W−1 keys (O(W) per device); full attention gathers all keys (O(T) per device).
    """
    positions = span_positions(x.shape[1], axis_name)
    q, k, v = attn._qkv(x, positions)
    if attn.window_size is None:
        k, v, k_positions, k_ids = _all_keys(k, v, segment_ids, axis_name)
    else:
        k, v, k_positions, k_ids = _window_keys(
            k, v, positions, segment_ids, attn.window_size, axis_name
        )
    return attn.attend(
        q, k, v, q_positions=positions, k_positions=k_positions,
        q_segment_ids=segment_ids, k_segment_ids=k_ids,
    )  # fmt: skip
