"""Causal self-attention with RoPE: full, or sliding-window (the hybrid model's SWA mixer)."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from gdn2_jax.layers import context
from gdn2_jax.layers.init import concat_kernels, dense, project, torch_linear_init
from gdn2_jax.layers.rope import apply_rope
from gdn2_jax.layers.segments import document_ids
from gdn2_jax.ops import sharded
from gdn2_jax.options import ATTENTION_IMPLEMENTATIONS


class KVCache(NamedTuple):
    """Ring buffer of rotated keys and values: position p lives in slot p mod L."""

    k: jax.Array  # [B, L, H_kv, D]
    v: jax.Array  # [B, L, H_kv, D]
    t: jax.Array  # [B] int32: tokens each row has seen (its next token's position)


class Attention(nnx.Module):
    """Multi-head (or grouped-query) causal attention; `window_size` keys per query when set.

    A window of W lets token t see tokens t−W+1 … t (flash-attention's `window_size=(W−1, 0)`,
    as lit_gpt's `local_window`). Decoding keeps only the last min(W, max_len) keys in a ring.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        window_size: int | None = None,
        rope_theta: float = 10000.0,
        rotary_dim: int | None = None,
        implementation: str = "auto",
        out_scale: float = 1.0,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        head_dim = hidden_size // num_heads if head_dim is None else head_dim
        _check_config(num_heads, num_kv_heads, head_dim, window_size, implementation)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.window_size, self.rope_theta, self.rotary_dim = window_size, rope_theta, rotary_dim
        self.implementation, self.dtype = implementation, dtype
        kw = dict(init=torch_linear_init(), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = dense(hidden_size, num_heads * head_dim, ("embed", "heads"), **kw)
        self.k_proj = dense(hidden_size, num_kv_heads * head_dim, ("embed", "kv_heads"), **kw)
        self.v_proj = dense(hidden_size, num_kv_heads * head_dim, ("embed", "kv_heads"), **kw)
        kw["init"] = torch_linear_init(out_scale)
        self.o_proj = dense(num_heads * head_dim, hidden_size, ("heads", "embed"), **kw)

    def _qkv(self, x, positions, kernel=None):
        """x [B, T, hidden] -> q [B, T, H, D], k, v [B, T, H_kv, D], q and k rotated; with
        `kernel` (`step_kernel()`) the three projections are one matmul."""
        B, T, _ = x.shape
        q, k, v = project((self.q_proj, self.k_proj, self.v_proj), x, kernel)
        q = q.reshape(B, T, self.num_heads, self.head_dim)
        k = k.reshape(B, T, self.num_kv_heads, self.head_dim)
        v = v.reshape(B, T, self.num_kv_heads, self.head_dim)
        rope = dict(theta=self.rope_theta, rotary_dim=self.rotary_dim)
        return apply_rope(q, positions, **rope), apply_rope(k, positions, **rope), v

    def _backend(self, dtype, masked: bool) -> str:
        if self.implementation != "auto":
            return self.implementation
        # cuDNN's fused kernel takes half precision and a causal/window mask, not segment masks.
        half = dtype in (jnp.bfloat16, jnp.float16)
        return "cudnn" if jax.default_backend() == "gpu" and half and not masked else "xla"

    def _window(self):
        return None if self.window_size is None else (self.window_size - 1, 0)

    def _full(self, x, segment_ids):
        """Attention over the whole input: (y [B, T, hidden], rotated k, v [B, T, H_kv, D])."""
        B, T, _ = x.shape
        q, k, v = self._qkv(x, jnp.arange(T))
        mask = None
        if segment_ids is not None:
            mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
        o = jax.nn.dot_product_attention(
            q, k, v,
            mask=mask,
            is_causal=True,
            local_window_size=self._window(),
            implementation=self._backend(q.dtype, mask is not None),
        )  # fmt: skip
        return self.o_proj(o.reshape(B, T, -1)), k, v

    def __call__(self, x, *, segment_ids=None):
        """x [B, T, hidden] -> [B, T, hidden]; `segment_ids` [B, T] keeps attention in-document
        (a document is a maximal run of equal ids: `gdn2_jax.layers.segments`).

        When the active mesh splits tokens over "context", each device attends from its span
        (`gdn2_jax.layers.context`): a halo of W−1 keys for a window, all keys gathered without.
        """
        if segment_ids is not None:
            # Run numbers, not raw ids: a reused id is a new document, as for the GDN-2 state
            # and the convolutions (computed on the global ids, before any context split).
            segment_ids = document_ids(segment_ids)
        axis = sharded.context_axis(x.shape[1])
        if axis is None:
            return self._full(x, segment_ids)[0]
        return context.context_parallel_attention(
            self, x,
            segment_ids=segment_ids,
            context_axis=axis,
            batch_axes=sharded.mesh_axes(sharded.BATCH_AXES, x.shape[0]) or (),
            head_axes=sharded.mesh_axes(sharded.HEAD_AXES, self.num_kv_heads) or (),
        )  # fmt: skip

    def cache_len(self, max_len: int) -> int:
        return max_len if self.window_size is None else min(self.window_size, max_len)

    def init_cache(self, batch_size: int, max_len: int, dtype=None) -> KVCache:
        shape = (batch_size, self.cache_len(max_len), self.num_kv_heads, self.head_dim)
        dtype = dtype or self.dtype or jnp.float32
        zeros = jnp.zeros(shape, dtype)
        return KVCache(zeros, zeros, jnp.zeros((batch_size,), jnp.int32))

    def prefill(self, x, *, max_len: int, lengths=None):
        """x [B, T, hidden] from position 0 -> (y, cache of the last keys for up to max_len).

        `lengths` [B] int32: row i's input is x[i, :lengths[i]] (right padding after it, which
        causal attention keeps out of the real tokens' outputs and the cache leaves out).
        """
        B, T, _ = x.shape
        y, k, v = self._full(x, None)
        L = self.cache_len(max_len)
        t = jnp.full((B,), T, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
        # Slot s holds the latest position p < t with p ≡ s (mod L); p < 0 leaves it empty.
        pos = (t - 1)[:, None] - ((t - 1)[:, None] - jnp.arange(L)) % L
        take = jnp.clip(pos, 0, T - 1)[..., None, None]
        filled = (pos >= 0)[..., None, None]
        k_buf = jnp.where(filled, jnp.take_along_axis(k, take, axis=1), 0)
        v_buf = jnp.where(filled, jnp.take_along_axis(v, take, axis=1), 0)
        return y, KVCache(k_buf, v_buf, t)

    def step_kernel(self) -> jax.Array:
        """q, k and v's kernels side by side, made once before a decoding loop for `kernel=`."""
        return concat_kernels((self.q_proj, self.k_proj, self.v_proj))

    def step(self, x_t, cache: KVCache, *, kernel=None):
        """One decoding token: x_t [B, hidden] -> (y_t [B, hidden], cache); `kernel`: this
        layer's `step_kernel()`, to read q, k and v's weights in one matmul (same numbers)."""
        B = x_t.shape[0]
        L = cache.k.shape[1]
        t = cache.t
        q, k, v = self._qkv(x_t[:, None], t[:, None], kernel)
        rows, slot = jnp.arange(B), t % L
        k_buf = cache.k.at[rows, slot].set(k[:, 0].astype(cache.k.dtype))
        v_buf = cache.v.at[rows, slot].set(v[:, 0].astype(cache.v.dtype))
        # After writing t, slot s holds position t − ((t − s) mod L); negative means still empty.
        slot_pos = t[:, None] - (t[:, None] - jnp.arange(L)) % L
        mask = (slot_pos >= 0)[:, None, None, :]
        o = jax.nn.dot_product_attention(q, k_buf.astype(q.dtype), v_buf.astype(q.dtype), mask=mask)
        return self.o_proj(o.reshape(B, -1)), KVCache(k_buf, v_buf, t + 1)


def _check_config(num_heads, num_kv_heads, head_dim, window_size, implementation):
    if num_heads < 1 or head_dim < 1:
        raise ValueError(f"num_heads and head_dim must be >= 1, got {num_heads} and {head_dim}")
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads={num_kv_heads} must divide num_heads={num_heads}")
    if window_size is not None and window_size < 1:
        raise ValueError(f"window_size must be >= 1 or None, got {window_size}")
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be one of {ATTENTION_IMPLEMENTATIONS}, got {implementation!r}"
        )
