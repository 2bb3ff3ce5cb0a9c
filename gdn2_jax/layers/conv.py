"""Causal depthwise short convolution with SiLU, a decoding cache and document resets."""

import jax
import jax.numpy as jnp
from flax import nnx

from gdn2_jax.layers.init import conv_bound, partitioned, uniform
from gdn2_jax.layers.segments import document_ids


class ShortConvolution(nnx.Module):
    """y_t = SiLU(Σ_j weight[j] · x_{t−(W−1)+j}) per channel; the cache holds the last W−1 inputs.

    `weight` is [W, D] (the last tap multiplies the current token); PyTorch's `Conv1d` weight
    [D, 1, W] is its transpose.
    """

    def __init__(
        self,
        features: int,
        kernel_size: int = 4,
        *,
        param_dtype=jnp.float32,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        if kernel_size < 1:
            raise ValueError(f"conv_size must be >= 1, got {kernel_size}")
        self.features = features
        self.kernel_size = kernel_size
        self.dtype = dtype
        init = partitioned(uniform(conv_bound(kernel_size)), ("conv", "heads"))
        self.weight = nnx.Param(init(rngs.params(), (kernel_size, features), param_dtype))

    def init_state(self, batch_size: int, dtype=jnp.float32):
        """Zero cache [B, W−1, D]: the inputs before the first token."""
        return jnp.zeros((batch_size, self.kernel_size - 1, self.features), dtype)

    def __call__(self, x, *, segment_ids=None, state=None, state_segment_ids=None, lengths=None):
        """x [B, T, D] -> (y [B, T, D], new state [B, W−1, D]).

        With `segment_ids` [B, T] a tap only reads tokens of the query token's own document; taps
        into `state` are then dropped, unless `state_segment_ids` [B, W−1] gives the documents of
        the state's tokens (a span continuing a sequence, e.g. the previous device's last tokens).
        With `lengths` [B] (right-padded rows) the new state is the one after row i's first
        lengths[i] tokens.
        """
        B, T, _ = x.shape
        dtype = self.dtype or x.dtype
        W = self.kernel_size
        if state is None:
            state = self.init_state(B, x.dtype)
        xp = jnp.concatenate([state.astype(x.dtype), x], axis=1)
        weight = self.weight[...].astype(dtype)
        y = jnp.zeros(x.shape, jnp.float32)
        for j in range(W):
            tap = xp[:, j : j + T].astype(dtype)
            if segment_ids is not None:
                same = _same_segment(segment_ids, lag=W - 1 - j, history=state_segment_ids)
                tap = tap * same[..., None].astype(dtype)
            y = y + jnp.einsum("btd,d->btd", tap, weight[j], preferred_element_type=jnp.float32)
        if lengths is None:
            return jax.nn.silu(y).astype(dtype), xp[:, T:]
        # Token t is xp[W−1+t], so the W−1 inputs before token L are xp[L : L+W−1].
        index = lengths[:, None] + jnp.arange(W - 1)
        return jax.nn.silu(y).astype(dtype), jnp.take_along_axis(xp, index[..., None], axis=1)

    def step(self, x_t, state):
        """One token: x_t [B, D], state [B, W−1, D] -> (y_t [B, D], new state)."""
        y, state = self(x_t[:, None], state=state)
        return y[:, 0], state


def _same_segment(segment_ids, *, lag: int, history=None):
    """[B, T] bool: token t−lag exists and belongs to token t's document (no document starts
    after it up to t: `gdn2_jax.layers.segments`, so a reused id is another document).

    `history` [B, W−1]: the segment ids of the W−1 tokens before t = 0, which then exist.
    """
    if history is not None:
        ids = jnp.concatenate([history.astype(segment_ids.dtype), segment_ids], axis=1)
        docs = document_ids(ids)
        offset = history.shape[1] - lag
        return docs[:, offset : offset + segment_ids.shape[1]] == docs[:, history.shape[1] :]
    if lag == 0:
        return jnp.ones(segment_ids.shape, bool)
    T = segment_ids.shape[1]
    docs = document_ids(segment_ids)
    shifted = jnp.pad(docs, ((0, 0), (lag, 0)))[:, :T]
    return (shifted == docs) & (jnp.arange(T) >= lag)
