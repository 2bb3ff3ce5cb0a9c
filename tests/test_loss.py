"""The chunked cross-entropy through the head: the plain loss's value and gradients, and no
[tokens, vocab] array anywhere in its forward or backward."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from gdn2_jax.crosscheck import rel_err
from gdn2_jax.loss import head_token_stats

B, T, D, VOCAB = 2, 24, 16, 128  # the vocabulary wider than hidden, as in a real head


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)
    head = jnp.asarray(rng.standard_normal((D, VOCAB)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, VOCAB, (B, T)), jnp.int32)
    mask = jnp.asarray(rng.random((B, T)) < 0.8, jnp.float32)
    return x, head, targets, mask


def _loss_and_grads(num_chunks):
    x, head, targets, mask = _inputs()

    def loss(x, head):
        stats = head_token_stats(x, head, targets, mask, num_chunks=num_chunks)
        return stats["loss_sum"], stats

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, head)


@pytest.mark.parametrize("num_chunks", [2, 5, 24])  # 5: T = 24 is padded to 25
def test_chunked_loss_matches_the_plain_loss(num_chunks):
    (_, plain), plain_grads = _loss_and_grads(1)
    (_, chunked), chunked_grads = _loss_and_grads(num_chunks)
    for key in ("tokens", "correct"):
        assert float(chunked[key]) == float(plain[key]), key
    # The same float32 per-token math; only the order of the sums differs.
    assert rel_err(chunked["loss_sum"], plain["loss_sum"]) <= 1e-6
    for name, got, want in zip(("dx", "dhead"), chunked_grads, plain_grads, strict=True):
        assert rel_err(got, want) <= 1e-6, name


def _largest_logits(jaxpr) -> int:
    """The size of the largest array over the vocabulary (the head and its gradient aside) in a
    program and every program nested in it."""
    largest = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            shape = getattr(var.aval, "shape", ())
            if shape[-1:] == (VOCAB,) and shape != (D, VOCAB):
                largest = max(largest, var.aval.size)
        for value in eqn.params.values():
            for item in value if isinstance(value, tuple | list) else (value,):
                if isinstance(item, jax.extend.core.ClosedJaxpr):
                    largest = max(largest, _largest_logits(item.jaxpr))
                elif isinstance(item, jax.extend.core.Jaxpr):
                    largest = max(largest, _largest_logits(item))
    return largest


@pytest.mark.parametrize(("num_chunks", "whole"), [(1, True), (4, False)])
def test_chunked_loss_never_holds_all_logits(num_chunks, whole):
    x, head, targets, mask = _inputs()

    def loss(x, head):
        return head_token_stats(x, head, targets, mask, num_chunks=num_chunks)["loss_sum"]

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, head).jaxpr
    largest = _largest_logits(jaxpr)
    assert (largest >= B * T * VOCAB) == whole
    if not whole:
        assert largest <= B * (T // num_chunks) * VOCAB


def test_bad_arguments_raise_naming_them():
    x, head, targets, mask = _inputs()
    with pytest.raises(ValueError, match="num_chunks"):
        head_token_stats(x, head, targets, mask, num_chunks=0)
    with pytest.raises(ValueError, match="targets"):
        head_token_stats(x, head, targets[:, :-1], mask)
