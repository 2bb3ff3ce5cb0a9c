"""Next-token cross-entropy through the LM head, whole or in token chunks.

The head's float32 logits are a training step's largest activation: [tokens, vocab] is 2 GiB at
16K tokens and a 32000-token vocabulary, and their gradient as much again. With `num_chunks > 1`
`head_token_stats` computes them one chunk of positions at a time inside a `lax.scan` whose body
is rematerialized, so the forward and the backward each hold one chunk's logits; the backward
recomputes a chunk's logits (one more head matmul) instead of reading stored ones.
"""

import jax
import jax.numpy as jnp


def head_logits(x: jax.Array, head: jax.Array) -> jax.Array:
    """x [..., hidden] (the final norm's output) @ head [hidden, vocab] -> float32 logits."""
    return jnp.einsum("...d,dv->...v", x, head.astype(x.dtype), preferred_element_type=jnp.float32)


def token_stats(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """Summed (not averaged) loss, token count and correct argmaxes over masked positions, so
    that micro-batches, eval batches and loss chunks combine exactly by addition."""
    logits = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return {
        "loss_sum": jnp.sum((logz - target_logit) * mask),
        "tokens": jnp.sum(mask),
        "correct": jnp.sum(correct * mask),
    }


def _strided_chunks(x: jax.Array, num_chunks: int) -> jax.Array:
    """[B, T', ...] -> [num_chunks, B, T'/num_chunks, ...]; chunk j holds positions j, j + n, ...

    Strided rather than contiguous: a chunk then spans every device a sharded row is split over
    (batch axes on B, a context axis on T), so each scan step keeps all of them busy.
    """
    B, T = x.shape[:2]
    x = x.reshape(B, T // num_chunks, num_chunks, *x.shape[2:])
    return jnp.moveaxis(x, 2, 0)


def head_token_stats(
    x: jax.Array,
    head: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    *,
    num_chunks: int = 1,
) -> dict[str, jax.Array]:
    """`token_stats(head_logits(x, head), targets, mask)` for x [B, T, hidden], targets and mask
    [B, T], holding the logits of about T / num_chunks positions per row at a time.

    `num_chunks = 1` materializes all logits; T need not divide by `num_chunks` (the tail is
    padded with masked positions)."""
    if not isinstance(num_chunks, int) or num_chunks < 1:
        raise ValueError(f"num_chunks must be a positive int, got {num_chunks!r}")
    if x.ndim != 3 or targets.shape != x.shape[:2] or mask.shape != x.shape[:2]:
        raise ValueError(
            f"x must be [B, T, hidden] with targets and mask [B, T]; got x {x.shape}, "
            f"targets {targets.shape}, mask {mask.shape}"
        )
    mask = mask.astype(jnp.float32)
    if num_chunks == 1:
        return token_stats(head_logits(x, head), targets, mask)
    pad = -x.shape[1] % num_chunks
    if pad:
        x, targets, mask = (
            jnp.pad(a, ((0, 0), (0, pad)) + ((0, 0),) * (a.ndim - 2)) for a in (x, targets, mask)
        )

    @jax.checkpoint
    def chunk_stats(x_c, targets_c, mask_c):
        return token_stats(head_logits(x_c, head), targets_c, mask_c)

    def body(totals, chunk):
        return jax.tree.map(jnp.add, totals, chunk_stats(*chunk)), None

    zeros = dict.fromkeys(("loss_sum", "tokens", "correct"), jnp.zeros((), jnp.float32))
    chunks = tuple(_strided_chunks(a, num_chunks) for a in (x, targets, mask))
    totals, _ = jax.lax.scan(body, zeros, chunks)
    return totals
