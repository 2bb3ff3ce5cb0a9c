"""The fused decoding step compiled for the GPU: the same greedy tokens as the unfused step, its
kernel in the program, and batched prompts of different lengths, on the 1.3B layer shapes.

`python -m pytest -m gpu tests/test_generate_gpu.py` where JAX has a GPU
(`scripts/generate_gpu_check.sh` runs it with the generation benchmark).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from testing import kernel_names, rel_err

from gdn2_jax.generate import GREEDY, Generator, generate
from gdn2_jax.layers import GatedDeltaRule2
from gdn2_jax.model import CausalLM
from gdn2_jax.model_config import ModelConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU visible to JAX"),
]

FUSED = "gdn2_fused_decode_step"
# Two GDN-2 blocks of the 1.3B model (d_model 2304, 16 heads x 128, vocab 32000), random init.
SHAPES = dict(block_pattern=("gdn2", "gdn2"))


def _model(decode, dtype="float32", **kw):
    cfg = ModelConfig.preset("gdn2-1.3b", gdn2_decode=decode, dtype=dtype, param_dtype=dtype,
                             **SHAPES, **kw)  # fmt: skip
    model = CausalLM(cfg, rngs=nnx.Rngs(0))
    model.eval()
    return model


def test_fused_decode_gives_the_same_greedy_tokens_on_gpu():
    """float32 weights (the paths differ by float32 rounding only; in bf16 a rounding flip of a
    near-tied random-init logit would end the comparison, not measure the kernel). Prompt 100
    takes the chunk prefill; 48 tokens decoded per row, batch 4."""
    prompt = jax.random.randint(jax.random.key(1), (4, 100), 0, 32000)
    out = {
        m: np.asarray(generate(_model(m), prompt, max_new_tokens=48)) for m in ("fused", "unfused")
    }
    np.testing.assert_array_equal(out["fused"], out["unfused"])


def test_one_row_decoded_as_two_gives_its_own_tokens_on_gpu():
    """`min_decode_rows=2` runs a one-row batch's projections as two-row matrix products (XLA
    rewrites one-row ones as a multiply and a reduction): the same greedy tokens (float32)."""
    model = _model("auto")
    prompt = jax.random.randint(jax.random.key(4), (1, 100), 0, 32000)
    one, two = (
        np.asarray(generate(model, prompt, max_new_tokens=48, min_decode_rows=n)) for n in (1, 2)
    )
    np.testing.assert_array_equal(two, one)


def test_decoding_programs_compile_without_the_dot_merger_on_gpu():
    """merge_dots=False: the compiled decoding program has none of the weight concatenations
    XLA's DotMerger adds on a GPU (where it merges a layer's projections that share an input),
    and the same greedy tokens as with it; concat_projections=False, whose own concatenations
    would be counted too."""
    model = _model("auto")  # float32: the two programs' products may round differently
    prompt = jax.random.randint(jax.random.key(5), (1, 64), 0, 32000)
    args = (prompt, jnp.full((1,), 64, jnp.int32), jnp.full((1,), -1, jnp.int32), jnp.int32(0))
    counts, tokens = {}, {}
    for merge in (False, True):
        gen = Generator(model, merge_dots=merge, concat_projections=False)
        compiled = gen.generate_fn.lower(
            gen.state, *args, jax.random.key(0), max_new_tokens=8, sampling=GREEDY, rows=1,
            min_rows=gen.min_decode_rows,
        ).compile()  # fmt: skip
        counts[merge] = compiled.as_text().count("concatenate(")
        tokens[merge] = np.asarray(gen.generate(prompt, max_new_tokens=8))
    assert counts[False] < counts[True], counts
    np.testing.assert_array_equal(tokens[False], tokens[True])


def test_concatenated_projections_give_the_same_tokens_on_gpu():
    """concat_projections (the default) against the projections apart: the same greedy tokens
    on the GPU, where the fused step runs and the merged matmul is one cuBLAS/Triton GEMM."""
    model = _model("auto")  # float32: a bf16 GEMM of other width may round differently
    prompt = jax.random.randint(jax.random.key(6), (2, 64), 0, 32000)
    apart, together = (
        np.asarray(generate(model, prompt, max_new_tokens=48, concat_projections=c))
        for c in (False, True)
    )
    np.testing.assert_array_equal(together, apart)


@pytest.mark.parametrize("block_v", [None, 32], ids=["whole_heads", "block_v32"])
def test_fused_step_in_bfloat16_and_its_kernel_on_gpu(block_v):
    """One layer, bf16 weights and compute, 16 steps: both paths round the same intermediates to
    bf16, so they agree to a few bf16 ulps (2**-8 ≈ 4e-3) where the kernel's float32 sums round
    differently from XLA's; 2e-2 is far below a wrong gate or layout (errors near 1). With
    block_v = 32 each head's state spans four programs and the norm follows in XLA."""
    # A fresh Rngs(0) per layer: one shared Rngs would give the two layers different weights.
    kw = dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    fused = GatedDeltaRule2(
        2304, 16, 128, decode="fused", decode_block_v=block_v, rngs=nnx.Rngs(0), **kw
    )
    unfused = GatedDeltaRule2(2304, 16, 128, decode="unfused", rngs=nnx.Rngs(0), **kw)
    x = jax.random.normal(jax.random.key(2), (8, 2304), jnp.bfloat16)
    cache = fused.init_cache(8)
    assert kernel_names(lambda x: fused.step(x, cache), x) == {FUSED: 1}
    outs = {}
    for name, layer in (("fused", fused), ("unfused", unfused)):
        step = jax.jit(lambda x, c, layer=layer: layer.step(x, c))
        c, ys = layer.init_cache(8), []
        for t in range(16):
            y, c = step(x * (0.5 + t / 8), c)
            ys.append(y)
        outs[name] = (jnp.stack(ys).astype(jnp.float32), c.S)
    assert rel_err(outs["fused"][0], outs["unfused"][0]) < 2e-2
    assert rel_err(outs["fused"][1], outs["unfused"][1]) < 2e-2


def test_ragged_prompts_equal_separate_generates_on_gpu():
    """Rows of 1, 130 and 300 tokens in one right-padded batch, each against its own call."""
    model = _model("auto")
    lengths = np.array([1, 130, 300], np.int32)
    prompt = jax.random.randint(jax.random.key(3), (3, 300), 0, 32000)
    out = np.asarray(generate(model, prompt, max_new_tokens=16, prompt_lengths=lengths))
    for i, L in enumerate(lengths):
        alone = np.asarray(generate(model, prompt[i : i + 1, :L], max_new_tokens=16))[0]
        np.testing.assert_array_equal(out[i, : L + 16], alone)
