"""Context parallelism for the token mixers around the GDN-2 op: what each device needs from
the devices holding earlier tokens of its sequence.

The span functions run inside `jax.shard_map` with the token axis split evenly over `axis_name`:
device d holds global tokens d·T_local … (d+1)·T_local − 1. Each returns exactly what the
single-device module returns for this span of the whole sequence.

  * Short convolution (kernel W): the previous W−1 inputs (and their documents) as the conv's
    state — a halo, zeros before token 0.
  * Sliding-window attention (window W): the previous W−1 rotated keys and values, with the mask
    built from global positions.
  * Full causal attention: every device's keys and values (all_gather), masked by global position.
  * Packed documents (segment ids): the GDN-2 layer's state reset at document starts needs the
    previous token's document, which `segment_starts` reads across the device boundary.

`context_parallel_attention`, `context_parallel_short_conv` and `context_parallel_segment_starts`
do the same on global arrays, under `jax.shard_map` on a mesh with a context axis; the layers call
them when the active mesh splits tokens over "context".
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from gdn2_jax.layers import segments
from gdn2_jax.layers.conv import ShortConvolution
from gdn2_jax.ops.context import spec_axes

if TYPE_CHECKING:  # the attention layer imports this module
    from gdn2_jax.layers.attention import Attention


def span_positions(T_local, axis_name):
    """Global positions [T_local] of this device's tokens."""
    return jax.lax.axis_index(axis_name) * T_local + jnp.arange(T_local)


def previous_tokens(x, n, axis_name):
    """The n tokens before this device's span: x [B, T_local, ...] -> [B, n, ...].

    Device d − h sends only the tokens d needs from it, for each distance h up to ⌈n / T_local⌉
    (one ppermute each), so a window longer than a span works too. Tokens before global token 0
    are zeros.
    """
    T = x.shape[1]
    size = jax.lax.axis_size(axis_name)
    blocks = []
    for hop in range(math.ceil(n / T), 0, -1):
        tail = x[:, T - min(T, n - (hop - 1) * T) :]
        if hop >= size:
            blocks.append(jnp.zeros_like(tail))
        else:
            perm = [(i, i + hop) for i in range(size - hop)]
            blocks.append(jax.lax.ppermute(tail, axis_name, perm))
    return jnp.concatenate(blocks, axis=1)


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
    starts = segments.segment_starts(segment_ids, previous_tokens(segment_ids, 1, axis_name))
    return starts | (span_positions(segment_ids.shape[1], axis_name) == 0)


def position_mask(q_positions, k_positions, window_size, q_segment_ids=None, k_segment_ids=None):
    """[B or 1, 1, Tq, Tk] bool: key position in (q − window, q], not negative (no such token), and
    with segment ids [B, Tq] / [B, Tk] in the query's document. Positions are [Tq] / [Tk]."""
    lag = q_positions[:, None] - k_positions[None, :]
    mask = (lag >= 0) & (k_positions >= 0)[None, :]
    if window_size is not None:
        mask &= lag < window_size
    mask = mask[None, None]
    if q_segment_ids is not None:
        mask &= (q_segment_ids[:, :, None] == k_segment_ids[:, None, :])[:, None]
    return mask


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


def attention_span(
    q, k, v, *, window_size, axis_name="context", segment_ids=None, implementation="xla"
):
    """Causal attention of this span: rotated q [B, T_local, H, D], k, v [B, T_local, H_kv, D],
    all at their global positions -> o [B, T_local, H, D].

    A sliding window takes a halo of the previous W−1 keys (O(W) per device); full attention
    gathers every key (O(T) per device). The mask is built from global positions.
    """
    positions = span_positions(q.shape[1], axis_name)
    if window_size is None:
        k, v, k_positions, k_ids = _all_keys(k, v, segment_ids, axis_name)
    else:
        keys = _window_keys(k, v, positions, segment_ids, window_size, axis_name)
        k, v, k_positions, k_ids = keys
    mask = position_mask(positions, k_positions, window_size, segment_ids, k_ids)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


def attention(attn: Attention, x, *, axis_name="context", segment_ids=None):
    """`attn(x, segment_ids=...)` on this span: x [B, T_local, hidden] -> [B, T_local, hidden]."""
    B, T, _ = x.shape
    q, k, v = attn._qkv(x, span_positions(T, axis_name))
    o = attention_span(
        q, k, v, window_size=attn.window_size, axis_name=axis_name, segment_ids=segment_ids,
        implementation=attn._backend(q.dtype, masked=True),
    )  # fmt: skip
    return attn.o_proj(o.reshape(B, T, -1))


# ------------------------------------------------------------ the same on global arrays


def _mesh(mesh):
    return jax.sharding.get_abstract_mesh() if mesh is None else mesh


def context_parallel_attention(
    attn: Attention,
    x,
    *,
    segment_ids=None,
    mesh=None,
    context_axis="context",
    batch_axes=(),
    head_axes=(),
):
    """`attn(x, segment_ids=...)` on global x [B, T, hidden] with T split over `context_axis`.

    Projections, RoPE (at global positions) and o_proj stay outside shard_map, partitioned by the
    compiler like the rest of the model; `attention_span` runs per span under shard_map on `mesh`
    (default: the one set with `jax.set_mesh`), heads split over `head_axes`.
    """
    B, T, _ = x.shape
    q, k, v = attn._qkv(x, jnp.arange(T))
    batch = spec_axes(batch_axes)
    spec = PartitionSpec(batch, context_axis, spec_axes(head_axes), None)
    given = {} if segment_ids is None else {"segment_ids": segment_ids}
    core = functools.partial(
        attention_span, window_size=attn.window_size, axis_name=context_axis,
        implementation=attn._backend(q.dtype, masked=True),
    )  # fmt: skip
    o = jax.shard_map(
        lambda q, k, v, given: core(q, k, v, **given),
        mesh=_mesh(mesh),
        in_specs=(spec, spec, spec, {n: PartitionSpec(batch, context_axis) for n in given}),
        out_specs=spec,
        check_vma=False,
    )(q, k, v, given)
    return attn.o_proj(o.reshape(B, T, -1))


def context_parallel_short_conv(
    conv: ShortConvolution,
    x,
    *,
    segment_ids=None,
    mesh=None,
    context_axis="context",
    batch_axes=(),
    channel_axes=(),
):
    """`conv(x, segment_ids=...)[0]` on global x [B, T, D] with T split over `context_axis` and
    channels over `channel_axes` (the weight [W, D] split with them), under shard_map."""
    graphdef, params = nnx.split(conv)
    batch, channels = spec_axes(batch_axes), spec_axes(channel_axes)
    given = {} if segment_ids is None else {"segment_ids": segment_ids}

    def local(params, x, given):
        return short_conv(nnx.merge(graphdef, params), x, axis_name=context_axis, **given)[0]

    spec = PartitionSpec(batch, context_axis, channels)
    return jax.shard_map(
        local,
        mesh=_mesh(mesh),
        in_specs=(
            jax.tree.map(lambda _: PartitionSpec(None, channels), params),
            spec,
            {n: PartitionSpec(batch, context_axis) for n in given},
        ),
        out_specs=spec,
        check_vma=False,
    )(params, x, given)


def context_parallel_segment_starts(
    segment_ids, *, mesh=None, context_axis="context", batch_axes=()
):
    """`segment_starts` on global segment ids [B, T] with T split over `context_axis`: where
    the GDN-2 layer resets its state, each span reading the previous span's last document."""
    spec = PartitionSpec(spec_axes(batch_axes), context_axis)
    return jax.shard_map(
        functools.partial(segment_starts, axis_name=context_axis),
        mesh=_mesh(mesh),
        in_specs=spec,
        out_specs=spec,
        check_vma=False,
    )(segment_ids)
