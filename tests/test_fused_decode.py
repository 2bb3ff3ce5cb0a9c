"""The fused decoding step (one Pallas kernel per GDN-2 layer, interpret mode on CPU) against the
unfused step: same outputs and caches, the same greedy tokens, its kernel in the traced program."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from testing import kernel_names, rel_err

from gdn2_jax.generate import generate
from gdn2_jax.layers import GatedDeltaRule2
from gdn2_jax.model import CausalLM
from gdn2_jax.model_config import ModelConfig

FUSED = "gdn2_fused_decode_step"
SERIAL = "gdn2_recurrent_fwd"
# float32 on both paths; XLA and the interpreted kernel contract the same products in other
# orders (e.g. the erase and output sums over K), so they agree to float32 rounding, not bits.
STEP_TOL = 1e-6


def _steps(layer, x, n):
    """n decoding steps from an empty cache on scaled copies of x -> (outputs [n, B, D], cache)."""

    @jax.jit
    def run(x):
        def body(cache, scale):
            y, cache = layer.step(x * scale, cache)
            return cache, y

        cache, ys = jax.lax.scan(body, layer.init_cache(x.shape[0]), jnp.linspace(0.5, 2.0, n))
        return ys, cache

    return run(x)


def test_fused_step_equals_unfused_step():
    """Grouped value heads, b in [0, 2], the sigmoid output gate and conv size 3 (the defaults
    run in the greedy model test below)."""
    kw = dict(num_v_heads=4, allow_neg_eigval=True, output_gate="sigmoid", conv_size=3)
    x = jax.random.normal(jax.random.key(1), (3, 64))
    fused, unfused = (
        GatedDeltaRule2(64, 2, 32, decode=mode, interpret=True, rngs=nnx.Rngs(0), **kw)
        for mode in ("fused", "unfused")
    )
    (y_f, cache_f), (y_u, cache_u) = _steps(fused, x, 4), _steps(unfused, x, 4)
    assert 0.0 < rel_err(y_f, y_u) < STEP_TOL
    for got, want in zip(cache_f, cache_u, strict=True):
        assert rel_err(got, want) < STEP_TOL
    cache = fused.init_cache(3)
    assert kernel_names(lambda x: fused.step(x, cache), x) == {FUSED: 1}
    assert kernel_names(lambda x: unfused.step(x, cache), x) == {SERIAL: 1}


def test_fused_step_in_bfloat16_equals_unfused_step():
    """bf16 weights and compute at K = V = 128: both paths round the same intermediates to bf16,
    so they agree to a few bf16 ulps (2**-8), far below a wrong gate or layout (errors near 1)."""
    kw = dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, interpret=True)
    fused, unfused = (
        GatedDeltaRule2(256, 2, 128, decode=mode, rngs=nnx.Rngs(0), **kw)
        for mode in ("fused", "unfused")
    )
    x = jax.random.normal(jax.random.key(2), (3, 256), jnp.bfloat16)
    (y_f, cache_f), (y_u, cache_u) = _steps(fused, x, 4), _steps(unfused, x, 4)
    assert rel_err(y_f.astype(jnp.float32), y_u.astype(jnp.float32)) < 2e-2
    for got, want in zip(cache_f, cache_u, strict=True):
        assert got.dtype == want.dtype
        assert rel_err(got.astype(jnp.float32), want.astype(jnp.float32)) < 2e-2


@pytest.mark.parametrize(
    ("K", "block_v", "programs"), [(32, 16, 2), (256, 64, 4)], ids=["K32_bv16", "K256_bv64"]
)
def test_fused_step_in_v_tiles_equals_unfused_step(K, block_v, programs):
    """A head's V columns over `programs` programs, the gated RMSNorm after the kernel: the
    unfused step's outputs and caches; at K = V = 256 only tiles fit a program's state."""
    kw = dict(num_v_heads=4, allow_neg_eigval=True, conv_size=3, interpret=True)
    x = jax.random.normal(jax.random.key(4), (2, 64))
    fused = GatedDeltaRule2(
        64, 2, K, decode="fused", decode_block_v=block_v, rngs=nnx.Rngs(0), **kw
    )
    unfused = GatedDeltaRule2(64, 2, K, decode="unfused", rngs=nnx.Rngs(0), **kw)
    (y_f, cache_f), (y_u, cache_u) = _steps(fused, x, 3), _steps(unfused, x, 3)
    assert 0.0 < rel_err(y_f, y_u) < STEP_TOL
    for got, want in zip(cache_f, cache_u, strict=True):
        assert rel_err(got, want) < STEP_TOL
    cache = fused.init_cache(2)
    jaxpr = str(jax.make_jaxpr(lambda x: fused.step(x, cache))(x))
    assert kernel_names(lambda x: fused.step(x, cache), x) == {FUSED: 1}
    assert f"grid=(2, 4, {programs})" in jaxpr.replace("grid_mapping=GridMapping(grid=", "grid=")


def test_fused_step_tile_limits_name_the_config():
    whole = GatedDeltaRule2(
        64, 2, 256, decode="fused", decode_block_v=128, interpret=True, rngs=nnx.Rngs(0)
    )
    assert "block_v" in whole.fused_decode_unsupported(jnp.float32)
    default = GatedDeltaRule2(64, 2, 256, decode="fused", interpret=True, rngs=nnx.Rngs(0))
    assert default.fused_decode_unsupported(jnp.float32) is None
    with pytest.raises(ValueError, match="decode_block_v"):
        GatedDeltaRule2(64, 2, 32, decode_block_v=24, rngs=nnx.Rngs(0))


def test_decode_warps_reach_the_fused_launch():
    """`decode_warps` sets the fused step's warps per program (default: derived from the tile),
    from ModelConfig too; other counts are an error naming the argument."""
    x = jax.random.normal(jax.random.key(6), (2, 64))

    def warps(**kw):
        layer = GatedDeltaRule2(
            64, 2, 32, decode="fused", decode_block_v=16, interpret=True, rngs=nnx.Rngs(0), **kw
        )
        cache = layer.init_cache(2)
        jaxpr = jax.make_jaxpr(lambda x: layer.step(x, cache))(x)
        return re.findall(r"num_warps=(\d+)", str(jaxpr))

    assert warps(decode_warps=4) == ["4"]
    assert warps() == ["1"]  # 32 x 16 state elements: one warp of 64 a thread
    cfg = ModelConfig.preset("tiny", gdn2_decode_warps=2)
    assert CausalLM(cfg, rngs=nnx.Rngs(0)).blocks[0].mixer.decode_warps == 2
    with pytest.raises(ValueError, match="decode_warps"):
        GatedDeltaRule2(64, 2, 32, decode_warps=3, rngs=nnx.Rngs(0))


def _decode_logits(model, token, caches):
    return model.decode_step(token, caches)[0]


def test_fused_decode_gives_the_same_greedy_tokens():
    """The recurrent tiny model decoding 8 tokens with each step path: identical tokens; the
    decode loop of the fused model runs one fused kernel per GDN-2 layer and step."""
    cfg = ModelConfig.preset("tiny", gdn2_interpret=True)
    prompt = jax.random.randint(jax.random.key(3), (2, 6), 0, cfg.vocab_size)
    out = {}
    for mode in ("fused", "unfused"):
        model = CausalLM(
            ModelConfig.preset("tiny", gdn2_interpret=True, gdn2_decode=mode), rngs=nnx.Rngs(5)
        )
        model.eval()
        out[mode] = np.asarray(generate(model, prompt, max_new_tokens=8))
        caches = jax.eval_shape(lambda p, m=model: m.prefill(p, max_len=14)[1], prompt)
        names = kernel_names(_decode_logits, model, prompt[:, 0], caches)
        assert names == ({FUSED: 2} if mode == "fused" else {SERIAL: 2})
    np.testing.assert_array_equal(out["fused"], out["unfused"])


def test_fused_decode_says_why_it_cannot_run():
    x = jnp.ones((2, 64))

    def layer(**kw):
        return GatedDeltaRule2(64, 2, 32, rngs=nnx.Rngs(0), **kw)

    cache = layer().init_cache(2)
    if jax.default_backend() != "gpu":
        with pytest.raises(NotImplementedError, match="needs a GPU"):
            layer(decode="fused").step(x, cache)
    with pytest.raises(NotImplementedError, match="gate_mode"):
        layer(decode="fused", gate_mode="kda", interpret=True).step(x, cache)
    with pytest.raises(NotImplementedError, match="scan"):
        layer(decode="fused", recurrent_backend="scan", interpret=True).step(x, cache)
    auto = layer(gate_mode="kda", interpret=True)
    assert kernel_names(lambda x: auto.step(x, cache), x) == {SERIAL: 1}, "auto: unfused for kda"
    with pytest.raises(ValueError, match="decode"):
        layer(decode="fast")
    with pytest.raises(ValueError, match="gdn2_decode"):
        ModelConfig.preset("tiny", gdn2_decode="fast")


def _dots(fn, *args) -> int:
    return str(jax.make_jaxpr(fn)(*args)).count("dot_general")


@pytest.mark.parametrize(
    ("decode", "gate_mode"),
    [("fused", "gdn2"), ("unfused", "gdn2"), ("unfused", "kda")],
    ids=["fused", "unfused", "unfused-kda"],
)
def test_step_with_concatenated_kernel_reads_the_inputs_in_one_matmul(decode, gate_mode):
    """`step(kernel=step_kernel())`: the projections that read x_t (q, k, v, the first factors
    of f and g, b, w) as one matmul, with the separate projections' outputs and caches."""
    layer = GatedDeltaRule2(
        64, 2, 32, decode=decode, gate_mode=gate_mode, num_v_heads=4, interpret=True,
        rngs=nnx.Rngs(0),
    )  # fmt: skip
    kernel = layer.step_kernel()
    inputs = 6 if gate_mode == "kda" else 7
    assert kernel.shape == (64, sum(p.out_features for p in layer._input_linears()))
    x = jax.random.normal(jax.random.key(5), (3, 64))
    cache = layer.init_cache(3)
    # Warm caches: a step from zeros would leave the conv history's products untested.
    for scale in (0.5, 1.5):
        _, cache = layer.step(x * scale, cache)
    (y_sep, cache_sep), (y_cat, cache_cat) = (
        layer.step(x, cache), layer.step(x, cache, kernel=kernel)
    )  # fmt: skip
    assert rel_err(y_cat, y_sep) < STEP_TOL
    for got, want in zip(cache_cat, cache_sep, strict=True):
        assert rel_err(got, want) < STEP_TOL
    separate = _dots(lambda x: layer.step(x, cache), x)
    together = _dots(lambda x, w: layer.step(x, cache, kernel=w), x, kernel)
    assert separate - together == inputs - 1
