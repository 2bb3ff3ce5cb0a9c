"""Autoregressive generation: prefill on the chunk path, then a jitted decode loop on the step path.

Generation runs the model in inference mode (`.eval()`), so prompts of at most 64 tokens prefill
with the token-serial kernel (as fla's layer) and longer ones with the chunk kernel. Prompts of
different lengths share one batch, right-padded (`prompt_lengths`); `stream` yields the tokens
as they are decoded.

The cache holds, per block, the GDN-2 conv history and float32 state (constant size) or an
attention KV ring buffer (the window for SWA, prompt + new tokens for full attention).
"""

import dataclasses
import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gdn2_jax.model import CausalLM
from gdn2_jax.typed_config import check_types, require, require_non_negative


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        check_types(self)
        require_non_negative(self, "temperature", "top_k")
        require(self, "top_p", 0.0 < self.top_p <= 1.0, "in (0, 1]")


GREEDY = SamplingConfig(temperature=0.0)


def _top_k_filter(logits, k: int):
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def _top_p_filter(logits, p: float):
    """Keeps the smallest set of most likely tokens whose probability reaches p."""
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # The most likely token always survives (its mass_before is 0 < p).
    kept = jnp.where(mass_before < p, sorted_logits, jnp.inf)
    threshold = jnp.min(kept, axis=-1, keepdims=True)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def sample_logits(logits, key, sampling: SamplingConfig = GREEDY):
    """logits [B, V] -> tokens [B] int32 (temperature, then top-k, then top-p)."""
    if sampling.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / sampling.temperature
    if sampling.top_k:
        logits = _top_k_filter(logits, min(sampling.top_k, logits.shape[-1]))
    if sampling.top_p < 1.0:
        logits = _top_p_filter(logits, sampling.top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


NO_EOS = -1  # an id no sampler emits: the row never stops early


# Prompt tokens prefilled at once by default: a 1.3B model's prefill holds about 0.7 MB of
# activations per token in flight (batch 64 of 2048 tokens asked for 84 GiB on one GPU).
PREFILL_TOKENS = 32768
# Rows a decoding step runs at least (see `Generator`): one row takes XLA's multiply-and-reduce
# rewrite of its matmuls.
MIN_DECODE_ROWS = 2


def prefill_rows(B: int, T: int, prefill_tokens: int | None) -> int:
    """How many of B prompt rows of T tokens prefill together: all of them, or the largest
    divisor of B whose rows hold at most `prefill_tokens` tokens (at least one row)."""
    if prefill_tokens is None or prefill_tokens >= B * T:
        return B
    most = max(1, prefill_tokens // T)
    return max(d for d in range(1, most + 1) if B % d == 0)


def _prefill_last(model, prompt, lengths, *, max_len, rows):
    """`model.prefill_last` over groups of `rows` rows in turn (a scan): rows are independent,
    so each row's logits and cache are its own; what is in flight scales with `rows`."""
    B = prompt.shape[0]
    if rows == B:
        return model.prefill_last(prompt, max_len=max_len, lengths=lengths)
    graphdef, state = nnx.split(model)

    def group(inputs):
        tokens, n = inputs
        return nnx.merge(graphdef, state).prefill_last(tokens, max_len=max_len, lengths=n)

    grouped = (prompt.reshape(B // rows, rows, -1), lengths.reshape(B // rows, rows))
    logits, caches = jax.lax.map(group, grouped)
    return jax.tree.map(lambda x: x.reshape(B, *x.shape[2:]), (logits, caches))


def _start(model, prompt, lengths, eos, key, *, max_len, sampling, rows):
    """Prefill every row's prompt and sample its first token -> (token, caches, done)."""
    model.eval()  # inference: prompts of at most 64 tokens take the token-serial kernel, as fla
    logits, caches = _prefill_last(model, prompt, lengths, max_len=max_len, rows=rows)
    first = sample_logits(logits, key, sampling)
    return first, caches, first == eos


def _pad_rows(tree, rows: int):
    """Every leaf [B, ...] -> [rows, ...]: rows past B copy row B − 1 (identity if B = rows)."""

    def pad(x):
        extra = rows - x.shape[0]
        return x if extra == 0 else jnp.concatenate([x, jnp.repeat(x[-1:], extra, axis=0)])

    return jax.tree.map(pad, tree)


def _decode(model, carry, keys, eos, pad, kernels, *, sampling, min_rows):
    """len(keys) decoding steps from carry = (token, caches, done) -> (carry, tokens [B, n]).

    A finished row (it emitted its eos) keeps stepping with its last token, masked: it emits
    pad. The loop is a scan of static length, so the device never waits on the host. The model
    steps at least `min_rows` rows (copies of the last; see `Generator`); sampling sees the B
    real rows only, so the tokens and random draws are those of the B rows alone. `kernels`:
    the model's `step_kernels()`, made before the loop, or None (projections apart).
    """
    token, caches, done = carry
    B = token.shape[0]
    rows = max(B, min_rows)

    def body(carry, key_t):
        token, caches, done = carry
        logits, caches = model.decode_step(_pad_rows(token, rows), caches, kernels)
        nxt = jnp.where(done, pad, sample_logits(logits[:B], key_t, sampling))
        return (jnp.where(done, token, nxt), caches, done | (nxt == eos)), nxt

    (token, caches, done), tokens = jax.lax.scan(body, (token, _pad_rows(caches, rows), done), keys)
    return (token, jax.tree.map(lambda x: x[:B], caches), done), tokens.T


def _assemble(prompt, lengths, new, pad):
    """Row i: prompt[i, :lengths[i]], then its new tokens, then pad, to width T + N."""
    T, N = prompt.shape[1], new.shape[1]
    col = jnp.arange(T + N)[None, :]
    offset = col - lengths[:, None]
    from_new = jnp.take_along_axis(new, jnp.clip(offset, 0, N - 1), axis=1)
    from_prompt = jnp.take_along_axis(prompt, jnp.clip(col, 0, T - 1), axis=1)
    out = jnp.where(offset < 0, from_prompt, jnp.where(offset < N, from_new, pad))
    return out.astype(jnp.int32)


def _generate(
    graphdef, state, prompt, lengths, eos, pad, key, *, max_new_tokens, sampling, rows, min_rows,
    concat,
):  # fmt: skip
    model = nnx.merge(graphdef, state)
    keys = jax.random.split(key, max_new_tokens)
    max_len = prompt.shape[1] + max_new_tokens
    carry = _start(
        model, prompt, lengths, eos, keys[0], max_len=max_len, sampling=sampling, rows=rows
    )
    kernels = model.step_kernels() if concat else None
    _, rest = _decode(
        model, carry, keys[1:], eos, pad, kernels, sampling=sampling, min_rows=min_rows
    )
    return _assemble(prompt, lengths, jnp.concatenate([carry[0][:, None], rest], axis=1), pad)


def _stream_start(graphdef, state, prompt, lengths, eos, key, *, max_len, sampling, rows):
    model = nnx.merge(graphdef, state)
    return _start(model, prompt, lengths, eos, key, max_len=max_len, sampling=sampling, rows=rows)


def _stream_decode(
    graphdef, state, carry, keys, eos, pad, kernels=None, *, sampling, min_rows, concat
):  # fmt: skip
    """Decoding steps; `kernels` (from the kernels program) saves making them in each call."""
    model = nnx.merge(graphdef, state)
    if kernels is None and concat:
        kernels = model.step_kernels()
    return _decode(model, carry, keys, eos, pad, kernels, sampling=sampling, min_rows=min_rows)


def _step_kernels(graphdef, state):
    return nnx.merge(graphdef, state).step_kernels()


# XLA's DotMerger turns matmuls that share an input (a layer's q, k, v, gate projections) into
# one matmul against the concatenation of their weights. Inside the decoding loop it re-copies
# those weights every step (profile of a 1.3B step at batch 1: 614 of 2470 us in concatenations,
# 129 in the slices of the merged product; benchmarks/RESULTS.md), so the decoding programs
# compile without it unless `merge_dots`; `concat_projections` concatenates the weights once,
# before the loop, instead.
NO_DOT_MERGER = {"xla_gpu_dot_merger_threshold_mb": 0}


@functools.lru_cache(maxsize=8)
def _programs(graphdef, merge_dots: bool = False, concat_projections: bool = True):
    """The jitted programs of one model structure, shared by every `Generator` of it (so that
    `generate`, which builds one per call, hashes the graph once and compiles once per shape):
    the step kernels (None without `concat_projections`), generation, prefill, decode steps."""
    run = functools.partial(_generate, graphdef, concat=concat_projections)
    start = functools.partial(_stream_start, graphdef)
    decode = functools.partial(_stream_decode, graphdef, concat=concat_projections)
    options = None if merge_dots else NO_DOT_MERGER
    kernels = jax.jit(functools.partial(_step_kernels, graphdef)) if concat_projections else None
    return (
        kernels,
        jax.jit(
            run, static_argnames=("max_new_tokens", "sampling", "rows", "min_rows"),
            compiler_options=options,
        ),
        jax.jit(start, static_argnames=("max_len", "sampling", "rows")),
        jax.jit(decode, static_argnames=("sampling", "min_rows"), compiler_options=options),
    )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class _Batch:
    """Validated `generate` inputs as device arrays."""

    prompt: jax.Array  # [B, T] int32
    lengths: jax.Array  # [B] int32
    eos: jax.Array  # [B] int32 (NO_EOS: no stop token)
    pad: jax.Array  # int32 scalar


def _batch(prompt, max_new_tokens, prompt_lengths, eos_id, pad_id: int) -> _Batch:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be [B, T] with T >= 1, got shape {prompt.shape}")
    B, T = prompt.shape
    if prompt_lengths is None:
        lengths = np.full((B,), T, np.int32)
    else:
        lengths = np.asarray(prompt_lengths)
        if lengths.shape != (B,) or not np.issubdtype(lengths.dtype, np.integer):
            raise ValueError(
                f"prompt_lengths must be integers of shape [B] = ({B},), got dtype "
                f"{lengths.dtype} and shape {lengths.shape}"
            )
        if lengths.min() < 1 or lengths.max() > T:
            raise ValueError(
                f"prompt_lengths must be in [1, T = {T}], got min {lengths.min()} and max "
                f"{lengths.max()}"
            )
    eos = np.asarray(NO_EOS if eos_id is None else eos_id)
    if eos.ndim > 1 or (eos.ndim == 1 and eos.shape != (B,)):
        raise ValueError(f"eos_id must be an int or [B] = ({B},) ints, got shape {eos.shape}")
    if not np.issubdtype(eos.dtype, np.integer):
        raise ValueError(f"eos_id must be integers, got dtype {eos.dtype}")
    return _Batch(
        prompt,
        jnp.asarray(lengths, jnp.int32),
        jnp.broadcast_to(jnp.asarray(eos, jnp.int32), (B,)),
        jnp.asarray(pad_id, jnp.int32),
    )


def _key(rng, sampling: SamplingConfig):
    """Sampling (`temperature > 0`) needs `rng`, a `jax.random.key`: the same key gives the same
    continuation, so a caller who wants new samples passes a new key each call (a hidden default
    key would return one sample forever). Greedy decoding draws nothing and needs none."""
    if rng is not None:
        return rng
    if sampling.temperature > 0:
        raise ValueError(
            f"generate: sampling with temperature={sampling.temperature} needs rng, a "
            "jax.random.key (e.g. rng=jax.random.key(seed)); pass temperature=0 for greedy"
        )
    return jax.random.key(0)  # only fills the slot: greedy decoding draws nothing


class Generator:
    """Generation from one model, split once: repeated calls skip walking the model's graph
    (`nnx.split`, tens of milliseconds of host time for a 1.3B model) and hashing its graph
    definition, and reuse the compiled programs of earlier calls with the same shapes.

    It holds the model's parameters as they are when it is built; build a new one after
    changing them. `sampling` and `pad_id` (the token after a row's end) are fixed per generator.
    `prefill_tokens` bounds the prompt tokens prefilled at once, which bounds the prefill's
    memory: a larger batch prefills in groups of rows, one after another (`prefill_rows`), with
    the same tokens as all at once; None prefills every row together. `min_decode_rows` pads
    a smaller batch's decoding step with copies of its last row: XLA turns a one-row matmul
    into a multiply and a reduction, and a second row keeps the projections matrix products
    (on an H100, 2.38 against 3.51 ms a token for the 1.3B model; benchmarks/RESULTS.md); the
    padding rows' tokens are dropped. `merge_dots` lets XLA merge matmuls that share an input
    in the decoding programs (`NO_DOT_MERGER`); `concat_projections` (the default) concatenates
    the weights of the projections that share an input once per call, before the decoding loop,
    so that each step reads them in one matmul (`CausalLM.step_kernels`; same tokens).
    """

    def __init__(
        self,
        model: CausalLM,
        *,
        sampling: SamplingConfig = GREEDY,
        pad_id: int = 0,
        prefill_tokens: int | None = PREFILL_TOKENS,
        min_decode_rows: int = MIN_DECODE_ROWS,
        merge_dots: bool = False,
        concat_projections: bool = True,
    ):
        if not isinstance(min_decode_rows, int | np.integer) or min_decode_rows < 1:
            raise ValueError(f"min_decode_rows must be an int >= 1, got {min_decode_rows!r}")
        self.min_decode_rows = int(min_decode_rows)
        if not isinstance(pad_id, int | np.integer):
            raise ValueError(f"pad_id must be an int, got {pad_id!r}")
        if prefill_tokens is not None and (
            not isinstance(prefill_tokens, int | np.integer) or prefill_tokens < 1
        ):
            raise ValueError(f"prefill_tokens must be an int >= 1 or None, got {prefill_tokens!r}")
        self.sampling, self.pad_id = sampling, int(pad_id)
        self.prefill_tokens = prefill_tokens
        graphdef, self.state = nnx.split(model)
        # The jitted pieces over (state, ...): whole generation, prefill + first sample, decode
        # steps; `benchmarks/bench_generate.py` times them apart.
        # `kernels_fn` (None without concat_projections) makes the concatenated projection
        # kernels that `stream` passes to each of its decode calls.
        self.kernels_fn, self.generate_fn, self.prefill_fn, self.decode_fn = _programs(
            graphdef, bool(merge_dots), bool(concat_projections)
        )

    def generate(self, prompt, *, max_new_tokens: int, rng=None, eos_id=None, prompt_lengths=None):
        """prompt [B, T] int32 -> [B, T + max_new_tokens] int32; see `generate`."""
        batch = _batch(prompt, max_new_tokens, prompt_lengths, eos_id, self.pad_id)
        rng = _key(rng, self.sampling)
        return self.generate_fn(
            self.state, batch.prompt, batch.lengths, batch.eos, batch.pad, rng,
            max_new_tokens=max_new_tokens, sampling=self.sampling, rows=self.rows(batch.prompt),
            min_rows=self.min_decode_rows,
        )  # fmt: skip

    def rows(self, prompt) -> int:
        """The prompt rows this generator prefills together for a [B, T] prompt."""
        return prefill_rows(*prompt.shape, self.prefill_tokens)

    def stream(
        self, prompt, *, max_new_tokens: int, every: int = 1, rng=None, eos_id=None,
        prompt_lengths=None,
    ) -> Iterator[np.ndarray]:  # fmt: skip
        """As `generate`, but yields the new tokens as they come: numpy [B, n] blocks, the first
        token alone, then n = `every` at a time (the last block may be shorter); concatenated
        they are `generate`'s new tokens (same rng, same keys). Each block is one compiled scan
        of `every` steps that the host reads back, so a larger `every` costs fewer round trips.
        Stops early once every row has emitted its eos (what would follow is pad).
        """
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        batch = _batch(prompt, max_new_tokens, prompt_lengths, eos_id, self.pad_id)
        keys = jax.random.split(_key(rng, self.sampling), max_new_tokens)
        max_len = batch.prompt.shape[1] + max_new_tokens
        carry = self.prefill_fn(
            self.state, batch.prompt, batch.lengths, batch.eos, keys[0],
            max_len=max_len, sampling=self.sampling, rows=self.rows(batch.prompt),
        )  # fmt: skip
        yield np.asarray(carry[0])[:, None]
        # Made once for the whole stream (each decode call would otherwise concatenate them).
        kernels = None if self.kernels_fn is None else self.kernels_fn(self.state)
        for start in range(1, max_new_tokens, every):
            if bool(np.asarray(carry[2]).all()):
                return
            block = keys[start : start + every]
            carry, tokens = self.decode_fn(
                self.state, carry, block, batch.eos, batch.pad, kernels, sampling=self.sampling,
                min_rows=self.min_decode_rows,
            )  # fmt: skip
            yield np.asarray(tokens)


def generate(
    model: CausalLM,
    prompt,
    *,
    max_new_tokens: int,
    sampling: SamplingConfig = GREEDY,
    rng=None,
    eos_id=None,
    prompt_lengths=None,
    pad_id: int = 0,
    prefill_tokens: int | None = PREFILL_TOKENS,
    min_decode_rows: int = MIN_DECODE_ROWS,
    merge_dots: bool = False,
    concat_projections: bool = True,
):
    """prompt [B, T] int32 -> [B, T + max_new_tokens] int32.

    `prompt_lengths` [B]: row i's prompt is prompt[i, :prompt_lengths[i]] (right padding after
    it); default: all T tokens. Output row i holds its prompt, then its max_new_tokens new
    tokens, then `pad_id` to the common width. `eos_id` (an int, or [B] ints: a stop token per
    row) ends a row: it keeps the eos and holds `pad_id` after it. Greedy rows equal separate
    `generate` calls of each row alone. `prefill_tokens` bounds the prompt tokens prefilled at
    once, `min_decode_rows` pads a smaller batch's decoding step, `merge_dots` lets XLA merge
    matmuls that share an input and `concat_projections` merges them once before the decoding
    loop (see `Generator`). For repeated calls or streaming use a
    `Generator`.
    """
    generator = Generator(
        model, sampling=sampling, pad_id=pad_id, prefill_tokens=prefill_tokens,
        min_decode_rows=min_decode_rows, merge_dots=merge_dots,
        concat_projections=concat_projections,
    )  # fmt: skip
    return generator.generate(
        prompt, max_new_tokens=max_new_tokens, rng=rng, eos_id=eos_id,
        prompt_lengths=prompt_lengths,
    )  # fmt: skip
