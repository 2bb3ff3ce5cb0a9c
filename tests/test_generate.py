"""Generation: prefill + cached decoding reproduces the full forward pass; the samplers."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from testing import rel_err

from gdn2_jax.generate import (
    GREEDY,
    Generator,
    SamplingConfig,
    generate,
    prefill_rows,
    sample_logits,
)
from gdn2_jax.layers import GatedDeltaRule2
from gdn2_jax.model import CausalLM
from gdn2_jax.model_config import ModelConfig

# float32 everywhere; the chunked prefill and the token-serial decode round differently,
# so logits (of size ~1) agree to a few float32 ulps times the depth, not bit-for-bit.
DECODE_TOL = 1e-5


def _tokens(B, T, vocab, seed=0):
    return jax.random.randint(jax.random.key(seed), (B, T), 0, vocab, jnp.int32)


@nnx.jit(static_argnames="max_len")
def _prefill(model, tokens, max_len):
    return model.prefill(tokens, max_len=max_len)


@nnx.jit
def _step(model, token, caches):
    return model.decode_step(token, caches)


@nnx.jit
def _forward(model, tokens):
    return model(tokens)


def _inference(model):
    """The model in inference mode: inputs of at most 64 tokens take the token-serial kernel."""
    model.eval()
    return model


def _decode_all(model, tokens, prompt_len):
    logits, caches = _prefill(model, tokens[:, :prompt_len], tokens.shape[1])
    out = [logits]
    for t in range(prompt_len, tokens.shape[1]):
        step_logits, caches = _step(model, tokens[:, t], caches)
        out.append(step_logits[:, None])
    return jnp.concatenate(out, axis=1)


@pytest.mark.parametrize(
    "pattern",
    [("gdn2", "gdn2"), ("gdn2", "swa"), ("attn", "gdn2")],
    ids=["recurrent", "hybrid-swa", "full-attention"],
)
def test_prefill_then_decode_matches_full_forward(pattern):
    """Prompt 70 tokens (chunk path, two chunks), then 10 decoded: the SWA ring (window 16) wraps
    during prefill and decode."""
    cfg = ModelConfig.preset("tiny-hybrid", block_pattern=pattern)
    model = CausalLM(cfg, rngs=nnx.Rngs(1))
    tokens = _tokens(2, 80, cfg.vocab_size)
    assert rel_err(_decode_all(model, tokens, 70), _forward(model, tokens)) < DECODE_TOL


def test_short_prompt_prefill_in_inference_mode_then_decode():
    """Prompt 21 tokens takes the token-serial kernel in inference mode; the reference too."""
    cfg = ModelConfig.preset("tiny-hybrid")
    model = _inference(CausalLM(cfg, rngs=nnx.Rngs(1)))
    tokens = _tokens(2, 40, cfg.vocab_size)
    assert rel_err(_decode_all(model, tokens, 21), _forward(model, tokens)) < DECODE_TOL


def test_prefill_of_one_token_then_decode():
    cfg = ModelConfig.preset("tiny-hybrid")
    model = _inference(CausalLM(cfg, rngs=nnx.Rngs(2)))
    tokens = _tokens(1, 12, cfg.vocab_size, seed=3)
    assert rel_err(_decode_all(model, tokens, 1), _forward(model, tokens)) < DECODE_TOL


def test_greedy_generate_equals_argmax_of_full_forward():
    """Each generated token is the argmax of the full forward over the tokens before it (one
    causal forward over the output gives every prefix's last logits at once)."""
    cfg = ModelConfig.preset("tiny-hybrid")
    model = _inference(CausalLM(cfg, rngs=nnx.Rngs(0)))
    prompt = _tokens(2, 9, cfg.vocab_size, seed=5)
    out = generate(model, prompt, max_new_tokens=8)
    assert out.shape == (2, 17)
    np.testing.assert_array_equal(np.asarray(out[:, :9]), np.asarray(prompt))
    greedy = jnp.argmax(_forward(model, out)[:, 8:-1], axis=-1)
    np.testing.assert_array_equal(np.asarray(out[:, 9:]), np.asarray(greedy))


def test_generate_stops_at_eos():
    cfg = ModelConfig.preset("tiny")
    model = CausalLM(cfg, rngs=nnx.Rngs(0))
    prompt = _tokens(1, 4, cfg.vocab_size)
    free = generate(model, prompt, max_new_tokens=6)
    eos = int(free[0, 6])  # the third generated token
    out = np.asarray(generate(model, prompt, max_new_tokens=6, eos_id=eos, pad_id=-7))
    np.testing.assert_array_equal(out[0, :7], np.asarray(free[0, :7]))
    assert (out[0, 7:] == -7).all()


# Row lengths: one token (shorter than the conv history), one that wraps the SWA window (16) at
# another slot than the full width; 70 > 64 runs the batch's prefill on the chunk path over the
# padding. Two rows a model: each separate call is a compile.
RAGGED_LENGTHS = {"tiny": (1, 70), "tiny-hybrid": (37, 70)}


@pytest.mark.parametrize("preset", ["tiny", "tiny-hybrid"], ids=["recurrent", "hybrid"])
def test_ragged_prompts_equal_separate_generates(preset):
    """Each row of a right-padded batch continues its own prompt exactly as a call with that row
    alone; after it comes pad_id. The padding holds an id outside the vocabulary (its embedding
    lookup would be NaN), which must not reach any row."""
    cfg = ModelConfig.preset(preset)
    model = _inference(CausalLM(cfg, rngs=nnx.Rngs(4)))
    lengths = np.array(RAGGED_LENGTHS[preset], np.int32)
    prompt = _tokens(len(lengths), 70, cfg.vocab_size, seed=6)
    prompt = jnp.where(jnp.arange(70) < lengths[:, None], prompt, 10 * cfg.vocab_size)
    N = 5
    out = np.asarray(generate(model, prompt, max_new_tokens=N, prompt_lengths=lengths, pad_id=-1))
    for i, L in enumerate(lengths):
        alone = np.asarray(generate(model, prompt[i : i + 1, :L], max_new_tokens=N))[0]
        np.testing.assert_array_equal(out[i, : L + N], alone)
        assert (out[i, L + N :] == -1).all()


def test_prefill_rows_divide_the_batch_within_the_token_budget():
    assert prefill_rows(64, 2048, 32768) == 16
    assert prefill_rows(8, 2048, 32768) == 8  # within the budget: all rows at once
    assert prefill_rows(6, 100, 250) == 2
    assert prefill_rows(7, 100, 250) == 1  # 7 has no divisor in 2..2
    assert prefill_rows(3, 1000, 10) == 1  # one row over the budget still runs
    assert prefill_rows(64, 2048, None) == 64


@pytest.mark.parametrize("preset", ["tiny", "tiny-hybrid"], ids=["recurrent", "hybrid"])
def test_prefill_in_groups_of_rows_equals_all_rows_at_once(preset):
    """A budget of two rows' tokens prefills four ragged rows as two groups, one after the other
    (a scan over the groups in the program): the same first logits and caches, to float32
    rounding, and the same greedy tokens."""
    cfg = ModelConfig.preset(preset)
    model = _inference(CausalLM(cfg, rngs=nnx.Rngs(4)))
    lengths = np.array([70, 3, 41, 66], np.int32)
    prompt = _tokens(4, 70, cfg.vocab_size, seed=8)
    grouped, whole = Generator(model, prefill_tokens=140), Generator(model, prefill_tokens=None)
    assert (grouped.rows(prompt), whole.rows(prompt)) == (2, 4)
    eos, key = jnp.full((4,), -1, jnp.int32), jax.random.key(0)
    args = (prompt, jnp.asarray(lengths), eos, key)
    program = grouped.prefill_fn.lower(grouped.state, *args, max_len=80, sampling=GREEDY, rows=2)
    assert "while" in program.as_text()
    first = [
        g.prefill_fn(g.state, *args, max_len=80, sampling=GREEDY, rows=g.rows(prompt))
        for g in (grouped, whole)
    ]
    for a, b in zip(jax.tree.leaves(first[0]), jax.tree.leaves(first[1]), strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=1e-5)
    kw = dict(max_new_tokens=6, prompt_lengths=lengths)
    np.testing.assert_array_equal(grouped.generate(prompt, **kw), whole.generate(prompt, **kw))


def test_stream_yields_generate_tokens_and_stops_per_row():
    """Blocks (the first token, then 3 at a time) concatenate to generate's new tokens, with a
    stop token per row; the stream ends with the block in which the last row stops."""
    cfg = ModelConfig.preset("tiny")
    model = CausalLM(cfg, rngs=nnx.Rngs(0))
    prompt, lengths = _tokens(2, 6, cfg.vocab_size, seed=2), np.array([6, 3], np.int32)
    free = np.asarray(generate(model, prompt, max_new_tokens=12, prompt_lengths=lengths))
    stop_at = (1, 3)  # the new-token index at which each row meets its own stop token
    eos = np.array([free[i, lengths[i] + stop_at[i]] for i in range(2)], np.int32)
    kw = dict(max_new_tokens=12, prompt_lengths=lengths, eos_id=eos)
    want = np.asarray(generate(model, prompt, pad_id=-1, **kw))
    new = np.stack([want[i, lengths[i] : lengths[i] + 12] for i in range(2)])
    blocks = list(Generator(model, pad_id=-1).stream(prompt, every=3, **kw))
    assert [b.shape[1] for b in blocks] == [1, 3]
    got = np.concatenate(blocks, axis=1)
    np.testing.assert_array_equal(got, new[:, : got.shape[1]])
    assert (new[:, got.shape[1] :] == -1).all()
    for i in range(2):
        first_stop = np.flatnonzero(free[i, lengths[i] :] == eos[i])[0]
        assert (new[i, : first_stop + 1] == free[i, lengths[i] : lengths[i] + first_stop + 1]).all()
        assert (new[i, first_stop + 1 :] == -1).all()


def test_decode_loop_has_a_static_trip_count():
    """The compiled generation's decode loop is a while loop XLA knows runs N − 1 times (on a GPU
    its predicate then never goes to the host)."""
    model = CausalLM(ModelConfig.preset("tiny"), rngs=nnx.Rngs(0))
    gen = Generator(model)
    B, N = 2, 7
    lengths, eos, pad = jnp.full((B,), 5, jnp.int32), jnp.full((B,), -1, jnp.int32), jnp.int32(0)
    args = (jnp.zeros((B, 5), jnp.int32), lengths, eos, pad, jax.random.key(0))
    hlo = gen.generate_fn.lower(
        gen.state, *args, max_new_tokens=N, sampling=GREEDY, rows=B, min_rows=1
    )
    text = hlo.compile().as_text()
    loops = re.findall(r"while\(.*known_trip_count\":\{\"n\":\"(\d+)\"", text)
    assert str(N - 1) in loops, loops


@pytest.mark.parametrize("preset", ["tiny", "tiny-hybrid"], ids=["recurrent", "hybrid"])
def test_min_decode_rows_pads_the_step_not_the_tokens(preset):
    """One row decoded as two (a copy of it): the step's state has two rows in the program, and
    the greedy and the sampled tokens (same key) are the one row's own, streamed or not."""
    cfg = ModelConfig.preset(preset)
    model = CausalLM(cfg, rngs=nnx.Rngs(3))
    prompt = _tokens(1, 7, cfg.vocab_size, seed=5)
    S = f"tensor<2x{cfg.gdn2_num_heads}x{cfg.gdn2_head_dim}x{cfg.gdn2_head_dim}xf32>"
    for sampling, rng in ((GREEDY, None), (SamplingConfig(temperature=1.0), jax.random.key(7))):
        kw = dict(max_new_tokens=9, rng=rng)
        one, two = (Generator(model, sampling=sampling, min_decode_rows=n) for n in (1, 2))
        want = np.asarray(one.generate(prompt, **kw))
        np.testing.assert_array_equal(np.asarray(two.generate(prompt, **kw)), want)
        streamed = np.concatenate(list(two.stream(prompt, every=4, **kw)), axis=1)
        np.testing.assert_array_equal(streamed, want[:, 7:])
    lengths, eos = jnp.full((1,), 7, jnp.int32), jnp.full((1,), -1, jnp.int32)
    args = (prompt, lengths, eos, jnp.int32(0), jax.random.key(0))
    for n, rows_in_program in ((1, False), (2, True)):
        text = two.generate_fn.lower(
            two.state, *args, max_new_tokens=4, sampling=GREEDY, rows=1, min_rows=n
        ).as_text()
        assert (S in text) == rows_in_program
    with pytest.raises(ValueError, match="min_decode_rows"):
        Generator(model, min_decode_rows=0)


@pytest.mark.parametrize("preset", ["tiny", "tiny-hybrid"], ids=["recurrent", "hybrid"])
def test_concat_projections_gives_the_same_tokens_with_fewer_matmuls(preset):
    """Kernels concatenated once before the loop: the decoding program's matmuls drop by 7 per
    GDN-2 block (its 7 input projections and the MLP's w1, w2 become 2) and 3 per attention
    block (q, k, v and w1, w2 become 2); greedy and sampled tokens, streamed or not, are those
    without."""
    cfg = ModelConfig.preset(preset)
    model = CausalLM(cfg, rngs=nnx.Rngs(4))
    prompt = _tokens(2, 7, cfg.vocab_size, seed=6)
    for sampling, rng in ((GREEDY, None), (SamplingConfig(temperature=1.0), jax.random.key(3))):
        kw = dict(max_new_tokens=9, rng=rng)
        apart, together = (
            Generator(model, sampling=sampling, concat_projections=c) for c in (False, True)
        )
        want = np.asarray(apart.generate(prompt, **kw))
        np.testing.assert_array_equal(np.asarray(together.generate(prompt, **kw)), want)
        streamed = np.concatenate(list(together.stream(prompt, every=4, **kw)), axis=1)
        np.testing.assert_array_equal(streamed, want[:, 7:])
    caches = model.prefill(prompt, max_len=16)[1]
    carry = (prompt[:, -1], caches, jnp.zeros((2,), bool))
    eos, keys = jnp.full((2,), -1, jnp.int32), jax.random.split(jax.random.key(0), 4)
    dots = [
        gen.decode_fn.lower(
            gen.state, carry, keys, eos, jnp.int32(0), sampling=GREEDY, min_rows=1
        ).as_text().count("stablehlo.dot_general")
        for gen in (apart, together)
    ]  # fmt: skip
    gdn2 = cfg.block_pattern.count("gdn2")
    assert dots[0] - dots[1] == 7 * gdn2 + 3 * (len(cfg.block_pattern) - gdn2)


LOGITS = jnp.log(jnp.array([[0.05, 0.4, 0.1, 0.3, 0.15]]))


def _draws(sampling, n=4000):
    keys = jax.random.split(jax.random.key(0), n)
    tokens = jax.vmap(lambda k: sample_logits(LOGITS, k, sampling))(keys)
    return np.bincount(np.asarray(tokens).ravel(), minlength=5) / n


def test_greedy_is_argmax():
    assert int(sample_logits(LOGITS, jax.random.key(0), GREEDY)[0]) == 1
    assert int(sample_logits(LOGITS, jax.random.key(0), SamplingConfig(top_k=1))[0]) == 1


def test_temperature_one_samples_the_softmax():
    # 4000 draws: binomial standard error ≤ 0.008, so 0.03 is about four standard errors.
    np.testing.assert_allclose(_draws(SamplingConfig()), np.exp(np.asarray(LOGITS[0])), atol=0.03)


def test_top_k_keeps_the_k_most_likely():
    freq = _draws(SamplingConfig(top_k=2))
    assert freq[[0, 2, 4]].sum() == 0
    np.testing.assert_allclose(freq[[1, 3]], [0.4 / 0.7, 0.3 / 0.7], atol=0.03)


def test_top_p_keeps_the_nucleus():
    # Sorted: 0.4, 0.3, 0.15, ... — 0.4 + 0.3 = 0.7 < 0.75, so the nucleus needs 0.15 too.
    freq = _draws(SamplingConfig(top_p=0.75))
    assert freq[[0, 2]].sum() == 0
    np.testing.assert_allclose(freq[[1, 3, 4]], np.array([0.4, 0.3, 0.15]) / 0.85, atol=0.03)


def test_low_temperature_concentrates_on_the_mode():
    assert _draws(SamplingConfig(temperature=0.05))[1] > 0.99


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"temperature": -1.0}, "temperature"), ({"top_k": -2}, "top_k"), ({"top_p": 0.0}, "top_p")],
)
def test_bad_sampling_config(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingConfig(**kwargs)


def test_bad_generate_arguments():
    model = CausalLM(ModelConfig.preset("tiny"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, jnp.zeros((1, 3), jnp.int32), max_new_tokens=0)
    with pytest.raises(ValueError, match="prompt"):
        generate(model, jnp.zeros((3,), jnp.int32), max_new_tokens=2)
    prompt = jnp.zeros((2, 3), jnp.int32)
    for lengths in ([3], [0, 3], [1, 4], [1.0, 2.0]):
        with pytest.raises(ValueError, match="prompt_lengths"):
            generate(model, prompt, max_new_tokens=2, prompt_lengths=lengths)
    with pytest.raises(ValueError, match="eos_id"):
        generate(model, prompt, max_new_tokens=2, eos_id=[1, 2, 3])
    with pytest.raises(ValueError, match="pad_id"):
        generate(model, prompt, max_new_tokens=2, pad_id=0.5)
    with pytest.raises(ValueError, match="every"):
        next(Generator(model).stream(prompt, max_new_tokens=2, every=0))
    for bad in (0, 2.5):
        with pytest.raises(ValueError, match="prefill_tokens must be an int >= 1 or None"):
            Generator(model, prefill_tokens=bad)


def test_sampling_without_rng_is_an_error_not_one_fixed_sample():
    """A default key would return the same "random" continuation on every call."""
    model = CausalLM(ModelConfig.preset("tiny"), rngs=nnx.Rngs(0))
    sampling = SamplingConfig(temperature=0.8)
    with pytest.raises(ValueError, match=r"temperature=0.8 needs rng, a jax.random.key"):
        generate(model, jnp.zeros((1, 3), jnp.int32), max_new_tokens=2, sampling=sampling)


def test_prefill_from_zeros_leaves_the_zero_state_unchecked():
    """A fresh prefill starts the op from its own zero state: passing the cache's zeros would
    make the op's value check a constant that XLA folds at compile time (seconds at batch 64
    for K = V = 128). Same state either way."""
    layer = GatedDeltaRule2(64, 2, 32, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 5, 64))
    zeros = layer.init_cache(2)
    fresh = jax.jit(lambda x: layer.prefill(x)[1].S)
    given = jax.jit(lambda x, c: layer.prefill(x, cache=c)[1].S)
    checks = [
        fresh.lower(x).as_text().count("is_finite"),
        given.lower(x, zeros).as_text().count("is_finite"),
    ]
    assert checks[0] == checks[1] - 1, checks
    np.testing.assert_array_equal(fresh(x), given(x, zeros))
