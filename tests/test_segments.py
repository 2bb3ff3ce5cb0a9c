"""One definition of a document for every mixer: a maximal run of equal segment ids.

A later document may reuse an earlier one's id (ids 1, 1, 2, 2, 1, 1 are three documents). Each
mixer on the packed row must equal the same mixer run on each document alone, in the forward and
in every gradient (inputs and parameters).
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gdn2_jax.crosscheck import rel_err
from gdn2_jax.layers import Attention, ShortConvolution
from gdn2_jax.layers.segments import document_ids, segment_starts
from gdn2_jax.model import CausalLM
from gdn2_jax.model_config import ModelConfig

D = 32
# Documents 1, 2 and 1 again; the second id-1 document starts 2 tokens after the first ends,
# within reach of the size-4 convolutions and of every attention key.
REUSED_IDS = (1, 1, 2, 2, 1, 1)
# Packed vs separate runs differ by float32 rounding only: attention sums the same terms
# (masked keys have weight exactly 0), and GDN-2 resets its state through g = −80
# (exp(−80) ≈ 2e−35 of the previous state) at another chunk offset. A leak between the two
# id-1 documents is an O(1) relative error.
TOL = 1e-5

# The GDN-2 layer (its state reset, after the convolutions) is checked inside the model below.
MIXERS = {
    "swa": lambda: Attention(D, 2, window_size=4, rngs=nnx.Rngs(0)),
    "attn": lambda: Attention(D, 2, rngs=nnx.Rngs(0)),
    "conv": lambda: ShortConvolution(D, 4, rngs=nnx.Rngs(0)),
}


def _bounds(ids):
    """[(start, end)] of each maximal run of equal ids."""
    edges = [0] + [t for t in range(1, len(ids)) if ids[t] != ids[t - 1]] + [len(ids)]
    return list(itertools.pairwise(edges))


def _output(mixer, x, ids):
    y = mixer(x) if ids is None else mixer(x, segment_ids=ids)
    return y[0] if isinstance(y, tuple) else y  # the convolution also returns its state


@nnx.jit
def _value_and_grads(mixer, x, cot, ids):
    """The output and the gradients of <output, cot> for x and every parameter."""

    def loss(mixer, x):
        y = _output(mixer, x, ids)
        return jnp.sum(y * cot), y

    (dparams, dx), y = nnx.grad(loss, argnums=(0, 1), has_aux=True)(mixer, x)
    return y, dparams, dx


def _flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree.leaves_with_path(tree)}


def test_document_ids_number_the_runs():
    ids = jnp.asarray([REUSED_IDS, (0, 0, 3, 3, 3, 0)])
    np.testing.assert_array_equal(document_ids(ids), [[1, 1, 2, 2, 3, 3], [1, 1, 2, 2, 2, 3]])
    starts = segment_starts(ids[:, 1:], previous=ids[:, :1])
    np.testing.assert_array_equal(starts, segment_starts(ids)[:, 1:])


@pytest.mark.parametrize("name", list(MIXERS))
def test_reused_segment_id_is_a_new_document(name):
    mixer = MIXERS[name]()
    T = len(REUSED_IDS)
    x = jax.random.normal(jax.random.key(1), (1, T, D), jnp.float32)
    cot = jax.random.normal(jax.random.key(2), (1, T, D), jnp.float32)
    ids = jnp.asarray([REUSED_IDS], jnp.int32)
    y, dparams, dx = _value_and_grads(mixer, x, cot, ids)

    separate = [_value_and_grads(mixer, x[:, a:b], cot[:, a:b], None) for a, b in _bounds(ids[0])]
    assert rel_err(y, jnp.concatenate([s[0] for s in separate], axis=1)) < TOL
    assert rel_err(dx, jnp.concatenate([s[2] for s in separate], axis=1)) < TOL
    summed = _flat(jax.tree.map(lambda *g: sum(g), *[s[1] for s in separate]))
    for path, grad in _flat(dparams).items():
        assert rel_err(grad, summed[path]) < TOL, path


def test_model_with_reused_ids_matches_separate_runs():
    """The hybrid model (GDN-2, its convolutions and sliding-window attention) on the packed
    documents: the same logits and parameter gradients as the documents one by one."""
    # The scan backend compiles fastest on a CPU; the reset at document starts is the layer's,
    # the same for every backend.
    cfg = ModelConfig.preset("tiny-hybrid", vocab_size=32, window_size=8, gdn2_backend="scan")
    model = CausalLM(cfg, rngs=nnx.Rngs(0))
    ids = np.asarray([REUSED_IDS], np.int32)
    tokens = jax.random.randint(jax.random.key(3), ids.shape, 0, cfg.vocab_size)
    cot = jax.random.normal(jax.random.key(4), (*ids.shape, cfg.vocab_size), jnp.float32)

    @nnx.jit
    def logits_and_grads(model, tokens, cot, ids):
        def loss(model):
            logits = model(tokens, segment_ids=ids)
            return jnp.sum(logits * cot), logits

        grads, logits = nnx.grad(loss, has_aux=True)(model)
        return logits, grads

    logits, grads = logits_and_grads(model, tokens, cot, jnp.asarray(ids))
    parts = [
        logits_and_grads(model, tokens[:, a:b], cot[:, a:b], jnp.ones((1, b - a), jnp.int32))
        for a, b in _bounds(ids[0])
    ]
    assert rel_err(logits, jnp.concatenate([p[0] for p in parts], axis=1)) < TOL
    summed = _flat(jax.tree.map(lambda *g: sum(g), *[p[1] for p in parts]))
    for path, grad in _flat(grads).items():
        assert rel_err(grad, summed[path]) < TOL, path
