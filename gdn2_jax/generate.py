"""Autoregressive generation: prefill on the chunk path, then a jitted decode loop on the step path.

Generation runs the model in inference mode (`.eval()`), so prompts of at most 64 tokens prefill
with the token-serial kernel (as fla's layer) and longer ones with the chunk kernel.

The cache holds, per block, the GDN-2 conv history and float32 state (constant size) or an
attention KV ring buffer (the window for SWA, prompt + new tokens for full attention).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
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


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "sampling", "eos_id"))
def _generate(graphdef, state, prompt, key, *, max_new_tokens, sampling, eos_id):
    model = nnx.merge(graphdef, state)
    model.eval()  # inference: prompts of at most 64 tokens take the token-serial kernel, as fla
    logits, caches = model.prefill(prompt, max_len=prompt.shape[1] + max_new_tokens)
    keys = jax.random.split(key, max_new_tokens)
    first = sample_logits(logits[:, -1], keys[0], sampling)
    eos = -1 if eos_id is None else eos_id

    def body(carry, key_t):
        token, caches, done = carry
        logits, caches = model.decode_step(token, caches)
        nxt = jnp.where(done, eos, sample_logits(logits, key_t, sampling))
        return (nxt, caches, done | (nxt == eos)), nxt

    _, rest = jax.lax.scan(body, (first, caches, first == eos), keys[1:])
    return jnp.concatenate([prompt, first[:, None], rest.T], axis=1)


def generate(
    model: CausalLM,
    prompt,
    *,
    max_new_tokens: int,
    sampling: SamplingConfig = GREEDY,
    rng=None,
    eos_id: int | None = None,
):
    """prompt [B, T] int32 -> [B, T + max_new_tokens]; after `eos_id` a row repeats it.

    Sampling (`temperature > 0`) needs `rng`, a `jax.random.key`: the same key gives the same
    continuation, so a caller who wants new samples passes a new key each call (there is no
    hidden default key, which would return one sample forever). Greedy decoding needs none.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be [B, T] with T >= 1, got shape {prompt.shape}")
    if rng is None:
        if sampling.temperature > 0:
            raise ValueError(
                f"generate: sampling with temperature={sampling.temperature} needs rng, a "
                "jax.random.key (e.g. rng=jax.random.key(seed)); pass temperature=0 for greedy"
            )
        rng = jax.random.key(0)  # greedy decoding draws nothing; the key only fills the slot
    graphdef, state = nnx.split(model)
    return _generate(
        graphdef, state, prompt, rng,
        max_new_tokens=max_new_tokens, sampling=sampling, eos_id=eos_id,
    )  # fmt: skip
