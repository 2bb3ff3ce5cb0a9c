"""The causal LMs: shapes and dtypes, presets, packed-document resets, annotations, bad configs."""

import contextlib
import dataclasses
import io

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from testing import kernel_names, rel_err

from gdn2_jax.model import CausalLM, count_params
from gdn2_jax.model_config import PRESETS, ModelConfig
from gdn2_jax.ops.core import OP_RESIDUALS_NAME

LOGICAL_AXES = {"vocab", "embed", "heads", "mlp", "conv", "kv_heads", None}


def _tokens(B, T, vocab, seed=0):
    return jax.random.randint(jax.random.key(seed), (B, T), 0, vocab, jnp.int32)


@pytest.fixture(scope="module", params=["tiny", "tiny-hybrid"])
def model(request):
    return CausalLM(ModelConfig.preset(request.param), rngs=nnx.Rngs(0))


def test_logits_shape_and_dtype(model):
    logits = model(_tokens(2, 37, model.config.vocab_size))
    assert logits.shape == (2, 37, model.config.vocab_size)
    assert logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_causal_in_tokens(model):
    """Changing token t leaves the logits before t untouched (exactly)."""
    tokens = _tokens(1, 30, model.config.vocab_size)
    changed = tokens.at[:, 20].set((tokens[:, 20] + 1) % model.config.vocab_size)
    a, b = model(tokens), model(changed)
    np.testing.assert_array_equal(np.asarray(a[:, :20]), np.asarray(b[:, :20]))
    assert not np.allclose(np.asarray(a[:, 20:]), np.asarray(b[:, 20:]))


def test_packed_documents_match_separate_runs(model):
    """Two documents (and padding) packed in one row equal each document run on its own.

    Tolerance 2e-5: the chunked op sees the second document at a different chunk offset and
    resets through g = −80 instead of a fresh state; both are float32 rounding-level changes.
    """
    V = model.config.vocab_size
    tokens = _tokens(2, 48, V)
    seg = np.zeros((2, 48), np.int32)
    seg[:, :20], seg[:, 20:44] = 1, 2  # the last 4 tokens are padding (segment 0)
    seg[1, 20:44] = 7
    packed = model(tokens, segment_ids=jnp.asarray(seg))
    first, second = model(tokens[:, :20]), model(tokens[:, 20:44])
    assert rel_err(packed[:, :20], first) < 2e-5
    assert rel_err(packed[:, 20:44], second) < 2e-5


def test_every_param_has_logical_axes(model):
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = var.get_metadata().get("out_sharding")
        assert axes is not None, path
        assert len(axes) == var.get_value().ndim, path
        assert set(axes) <= LOGICAL_AXES, (path, axes)


def test_bf16_compute_with_f32_params():
    cfg = ModelConfig.preset("tiny-hybrid", dtype="bfloat16")
    model = CausalLM(cfg, rngs=nnx.Rngs(0))
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(p.dtype == jnp.float32 for p in params)
    logits = model(_tokens(2, 33, cfg.vocab_size))
    assert logits.dtype == jnp.float32
    ref = CausalLM(dataclasses.replace(cfg, dtype="float32"), rngs=nnx.Rngs(0))
    # bf16 has an 8-bit mantissa (≈ 4e-3 per op); a few layers keep the logits within a few %.
    assert rel_err(logits, ref(_tokens(2, 33, cfg.vocab_size))) < 5e-2


def test_gradients_flow_to_every_param():
    model = CausalLM(ModelConfig.preset("tiny-hybrid"), rngs=nnx.Rngs(0))
    tokens = _tokens(2, 24, model.config.vocab_size)

    def loss_fn(m):
        logits = m(tokens[:, :-1])
        return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    grads = nnx.grad(loss_fn)(model)
    for path, g in nnx.to_flat_state(grads):
        assert bool(jnp.all(jnp.isfinite(g[...]))), path
        assert float(jnp.abs(g[...]).max()) > 0, path


def _param_grads(cfg, tokens):
    """Parameter gradients of a next-token loss, as a flat {path: array}."""
    model = CausalLM(cfg, rngs=nnx.Rngs(0))

    def loss_fn(m):
        logits = m(tokens[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

    return dict(nnx.to_flat_state(nnx.grad(loss_fn)(model)))


@pytest.mark.parametrize("policy", ["full", "dots_and_gdn2_op"])
def test_remat_gives_the_same_gradients(policy):
    cfg = ModelConfig.preset("tiny", block_pattern=("gdn2", "swa"))
    tokens = _tokens(2, 40, cfg.vocab_size)
    plain = _param_grads(cfg, tokens)
    remat = _param_grads(dataclasses.replace(cfg, remat=True, remat_policy=policy), tokens)
    assert plain.keys() == remat.keys()
    for path, g in plain.items():
        # The recomputed forward is the same program: float32 agreement to rounding.
        assert rel_err(remat[path][...], g[...]) <= 1e-6, path


def test_remat_recomputes_each_forward_kernel_once():
    """Per GDN-2 block: without remat the forward kernels run once and the backward's three
    once; with remat the forward kernels run twice (forward, and recomputed in the backward)."""
    cfg = ModelConfig.preset("tiny", gdn2_backend="pallas", gdn2_interpret=True)
    tokens = _tokens(1, 64, cfg.vocab_size)
    backward = (
        "gdn2_chunk_bwd_dstate",
        "gdn2_chunk_bwd_wy",
        "gdn2_chunk_bwd_diag",
        "gdn2_chunk_bwd_intra",
    )
    forward = ("gdn2_chunk_fwd_diag", "gdn2_chunk_fwd_intra", "gdn2_chunk_fwd_state_save")
    blocks = cfg.num_layers
    for remat, runs in ((False, 1), (True, 2)):
        model = CausalLM(dataclasses.replace(cfg, remat=remat), rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)

        def loss(state, graphdef=graphdef):
            return jnp.sum(nnx.merge(graphdef, state)(tokens) ** 2)

        counts = kernel_names(jax.grad(loss), state)
        assert counts == {
            **dict.fromkeys(forward, runs * blocks),
            **dict.fromkeys(backward, blocks),
        }


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_gdn2_op_remat_policy_keeps_the_op_residuals(backend):
    """Under "gdn2_op" the backward reads the op's saved residuals (so it need not rerun the
    op's forward kernels); under "full" it saves nothing of the op."""
    import pallas_kernels.chunk

    assert pallas_kernels.chunk.RESIDUALS_NAME == OP_RESIDUALS_NAME
    cfg = ModelConfig.preset("tiny", gdn2_backend=backend, gdn2_interpret=True, remat=True)
    tokens = _tokens(1, 64, cfg.vocab_size)
    named = {}
    for policy in ("full", "gdn2_op"):
        model = CausalLM(dataclasses.replace(cfg, remat_policy=policy), rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)

        def loss(state, graphdef=graphdef):
            return jnp.sum(nnx.merge(graphdef, state)(tokens) ** 2)

        with contextlib.redirect_stdout(io.StringIO()) as saved:
            jax.ad_checkpoint.print_saved_residuals(loss, state)
        named[policy] = saved.getvalue().count(f"named '{OP_RESIDUALS_NAME}'")
    assert named["full"] == 0
    assert named["gdn2_op"] >= 7 * cfg.num_layers  # q, k, v, g, b, w and the initial state


def test_tied_embeddings_have_no_head():
    model = CausalLM(ModelConfig.preset("tiny", tie_embeddings=True), rngs=nnx.Rngs(0))
    assert model.lm_head is None
    assert model(_tokens(1, 5, 256)).shape == (1, 5, 256)


@pytest.mark.parametrize(
    ("name", "expected"),
    # NVIDIA's lit_gpt comments count 1,302,638,112 and 1,300,314,384 parameters for these: all
    # but the embedding, the untied head and the final norm (2 · 32000 · 2304 + 2304 = 147,458,304).
    [("gdn2-1.3b", 1_302_638_112), ("hybrid-1.3b", 1_300_314_384)],
)
def test_paper_presets_match_reference_parameter_counts(name, expected):
    cfg = ModelConfig.preset(name)
    model = nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0)))
    outside = 2 * cfg.vocab_size * cfg.hidden_size + cfg.hidden_size
    assert count_params(model) - outside == expected


def test_presets_are_valid_and_hybrids_alternate():
    for name, cfg in PRESETS.items():
        assert ModelConfig.preset(name) == cfg
        if name.startswith("hybrid"):
            assert cfg.block_pattern[0::2] == ("gdn2",) * (cfg.num_layers // 2)
            assert cfg.block_pattern[1::2] == ("swa",) * (cfg.num_layers // 2)
    assert ModelConfig.from_dict(PRESETS["tiny"].to_dict()) == PRESETS["tiny"]


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"vocab_size": 0}, "vocab_size"),
        ({"block_pattern": ("gdn2", "mamba")}, "block_pattern"),
        ({"block_pattern": ()}, "block_pattern"),
        ({"gate_mode": "both"}, "gate_mode"),
        ({"output_gate": "relu"}, "output_gate"),
        ({"dtype": "int8"}, "dtype"),
        ({"attn_num_heads": 5}, "attn_num_heads"),
        ({"attn_num_kv_heads": 3}, "attn_num_kv_heads"),
        ({"gdn2_backend": "cuda"}, "gdn2_backend"),
        ({"remat_policy": "some"}, "remat_policy"),
        ({"loss_chunks": 0}, "loss_chunks"),
    ],
)
def test_bad_config_raises_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig.preset("tiny-hybrid", **overrides)


def test_unknown_preset():
    with pytest.raises(ValueError, match="preset"):
        ModelConfig.preset("gdn2-7b")


def test_bad_layer_config_in_model_raises():
    with pytest.raises(ValueError, match="num_v_heads"):
        CausalLM(ModelConfig.preset("tiny", gdn2_num_v_heads=3), rngs=nnx.Rngs(0))
