"""Checkpoint conversion: exact round trips (layer <-> fla GatedDeltaNet2, LM <-> lit_gpt GPT
naming, safetensors and torch.save files, the command line), a PyTorch re-implementation of
lit_gpt's GPT forward on converted weights, and mismatched checkpoints."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from testing import HIDDEN, make_fla_layer, rel_err

from gdn2_jax import convert
from gdn2_jax.layers import GatedDeltaRule2
from gdn2_jax.model import CausalLM
from gdn2_jax.model_config import ModelConfig

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _assert_same(a: dict, b: dict):
    assert list(a) == list(b) or sorted(a) == sorted(b)
    for name in a:
        x, y = np.asarray(a[name]), np.asarray(b[name])
        assert x.dtype == y.dtype and x.shape == y.shape, name
        np.testing.assert_array_equal(x, y, err_msg=name)


def _params(module):
    return {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(module))}


# ---------------------------------------------------------------------------------------------
# The layer


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(num_v_heads=4, expand_v=2.0, allow_neg_eigval=True)],
    ids=["default", "gva"],
)
def test_layer_round_trip_through_fla_module_is_exact(kwargs):
    """JAX -> fla GatedDeltaNet2 (load_state_dict, strict) -> JAX: every parameter bit-equal."""
    from fla.layers import GatedDeltaNet2

    layer = GatedDeltaRule2(HIDDEN, 2, 16, rngs=nnx.Rngs(0), **kwargs)
    ref = GatedDeltaNet2(hidden_size=HIDDEN, num_heads=2, head_dim=16, **kwargs)
    ref.load_state_dict(convert.to_torch(convert.layer_state_dict(layer)), strict=True)
    back = convert.load_layer_state_dict(
        GatedDeltaRule2(HIDDEN, 2, 16, rngs=nnx.Rngs(1), **kwargs), ref.state_dict()
    )
    _assert_same(_params(back), _params(layer))


def test_layer_from_torch_then_back_is_exact(fla_on_cpu):
    ref = make_fla_layer(fla_on_cpu, num_heads=2, head_dim=16)
    layer = GatedDeltaRule2(HIDDEN, 2, 16, output_gate="sigmoid", rngs=nnx.Rngs(0))
    convert.load_layer_state_dict(layer, ref.state_dict())
    expected = {k: v.numpy() for k, v in ref.state_dict().items()}
    _assert_same(convert.layer_state_dict(layer), expected)


def test_layer_checkpoint_mismatch_raises():
    layer = GatedDeltaRule2(HIDDEN, 2, 16, rngs=nnx.Rngs(0))
    sd = convert.layer_state_dict(layer)
    with pytest.raises(ValueError, match=re.escape("missing keys ['w_proj.weight']")):
        convert.load_layer_state_dict(layer, {k: v for k, v in sd.items() if k != "w_proj.weight"})
    with pytest.raises(ValueError, match=re.escape("unexpected keys ['extra']")):
        convert.load_layer_state_dict(layer, sd | {"extra": np.zeros(1)})
    with pytest.raises(ValueError, match=re.escape("'q_conv1d.weight' has shape (32, 1, 3)")):
        convert.load_layer_state_dict(layer, sd | {"q_conv1d.weight": np.zeros((32, 1, 3))})


# ---------------------------------------------------------------------------------------------
# The LM and lit_gpt naming

HYBRID = dict(attn_num_kv_heads=1, attn_num_heads=4, hidden_size=64, gdn2_num_heads=2)


@pytest.mark.parametrize(
    ("preset", "overrides"),
    [
        ("tiny-hybrid", HYBRID),
        ("tiny", dict(tie_embeddings=True, param_dtype="bfloat16")),
    ],
    ids=["hybrid-gqa", "tied-bf16"],
)
def test_lm_round_trip_is_exact(preset, overrides, tmp_path):
    cfg = ModelConfig.preset(preset, **overrides)
    model = CausalLM(cfg, rngs=nnx.Rngs(0))
    sd = convert.lm_state_dict(model)
    assert "lm_head.weight" in sd and "transformer.wte.weight" in sd
    if cfg.block_pattern[1] == "swa":
        assert sd["transformer.h.1.attn.attn.weight"].shape == ((4 + 2) * 16, 64)
    back = convert.load_lm_state_dict(CausalLM(cfg, rngs=nnx.Rngs(1)), convert.to_torch(sd))
    _assert_same(_params(back), _params(model))
    # Files: safetensors (numpy only) and torch.save with lit_gpt's {"model": ...} wrapper.
    convert.save_torch_file(sd, tmp_path / "m.safetensors")
    _assert_same(convert.load_torch_file(tmp_path / "m.safetensors"), sd)
    torch.save({"model": convert.to_torch(sd), "iter_num": 3}, tmp_path / "m.pth")
    _assert_same(convert.load_torch_file(tmp_path / "m.pth"), sd)


def test_lm_checkpoint_mismatch_raises():
    cfg = ModelConfig.preset("tiny-hybrid")
    sd = convert.lm_state_dict(CausalLM(cfg, rngs=nnx.Rngs(0)))
    model = CausalLM(cfg, rngs=nnx.Rngs(1))
    with pytest.raises(
        ValueError, match=re.escape("missing keys ['transformer.h.1.attn.proj.weight']")
    ):
        convert.load_lm_state_dict(
            model, {k: v for k, v in sd.items() if k != "transformer.h.1.attn.proj.weight"}
        )
    with pytest.raises(ValueError, match=re.escape("transformer.h.1.attn.attn.weight")):
        bad = sd | {"transformer.h.1.attn.attn.weight": np.zeros((10, 64), np.float32)}
        convert.load_lm_state_dict(model, bad)
    recurrent = CausalLM(ModelConfig.preset("tiny"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="unexpected keys"):  # hybrid checkpoint, recurrent config
        convert.load_lm_state_dict(recurrent, sd)
    tied = CausalLM(ModelConfig.preset("tiny-hybrid", tie_embeddings=True), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="tie_embeddings"):
        convert.load_lm_state_dict(tied, sd)


def _lit_gpt_forward(sd: dict, cfg: ModelConfig, tokens, fla_cls):
    """NVIDIA's lit_gpt GPT forward in plain PyTorch (flash-attn replaced by masked SDPA)."""
    w = {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * weight

    def rope(x):  # non-interleaved, full rotary (rotary_percentage=1.0)
        T, D = x.shape[1], x.shape[-1]
        theta = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2).float() / D))
        ang = torch.outer(torch.arange(T).float(), theta)
        cos, sin = (f(ang).repeat(1, 2)[None, :, None] for f in (torch.cos, torch.sin))
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    def attention(x, prefix, window):
        B, T, C = x.shape
        H, G = cfg.attn_num_heads, cfg.attn_num_kv_heads or cfg.attn_num_heads
        D = C // H
        qkv = (x @ w[f"{prefix}.attn.weight"].T).view(B, T, G, H // G + 2, D)
        q, k, v = qkv.split((H // G, 1, 1), dim=-2)
        q, k, v = (t.reshape(B, T, -1, D) for t in (q, k, v))
        q, k = rope(q), rope(k)
        k, v = (t.repeat_interleave(H // G, dim=2) for t in (k, v))
        i = torch.arange(T)
        mask = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < (window or T))
        o = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=mask)
        return o.transpose(1, 2).reshape(B, T, C) @ w[f"{prefix}.proj.weight"].T

    x = w["transformer.wte.weight"][torch.from_numpy(np.array(tokens))]
    for i, kind in enumerate(cfg.block_pattern):
        p = f"transformer.h.{i}"
        n1 = rms(x, w[f"{p}.norm_1.weight"])
        if kind == "gdn2":
            layer = fla_cls(hidden_size=cfg.hidden_size, head_dim=cfg.gdn2_head_dim,
                            num_heads=cfg.gdn2_num_heads)  # fmt: skip
            layer.o_norm.activation = "swish"  # NVIDIA's FusedRMSNormSwishGate
            n = len(f"{p}.attn.")
            layer.load_state_dict({k[n:]: v for k, v in w.items() if k.startswith(f"{p}.attn.")})
            h = layer(n1)[0]
        else:
            h = attention(n1, f"{p}.attn", cfg.window_size if kind == "swa" else None)
        x = x + h
        n2 = rms(x, w[f"{p}.norm_2.weight"])
        w1, w2, w3 = (w[f"{p}.mlp.swiglu.{n}.weight"] for n in ("w1", "w2", "w3"))
        x = x + (F.silu(n2 @ w1.T) * (n2 @ w2.T)) @ w3.T
    return rms(x, w["transformer.ln_f.weight"]) @ w["lm_head.weight"].T


def test_converted_lm_matches_lit_gpt_forward(fla_on_cpu):
    """Hybrid (GDN-2, SWA with GQA, full attention) logits agree with a PyTorch lit_gpt forward:
    this pins the fused qkv layout, RoPE and the block wiring, not only self-consistency."""
    cfg = ModelConfig.preset("tiny-hybrid", block_pattern=("gdn2", "swa", "attn"), **HYBRID)
    model = CausalLM(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (2, 70), 0, cfg.vocab_size, jnp.int32)
    with torch.no_grad():
        ref = _lit_gpt_forward(convert.lm_state_dict(model), cfg, tokens, fla_on_cpu)
    assert rel_err(model(tokens), ref.numpy()) <= 1e-4


# ---------------------------------------------------------------------------------------------
# The command line


def test_cli_round_trip(tmp_path, capsys):
    cfg = ModelConfig.preset("tiny-hybrid")
    sd = convert.lm_state_dict(CausalLM(cfg, rngs=nnx.Rngs(0)))
    convert.save_torch_file(sd, tmp_path / "lit.pth")
    jax_file, out = tmp_path / "model.safetensors", tmp_path / "back.safetensors"
    argv = ["--from-torch", str(tmp_path / "lit.pth"), "--config", "tiny", "--out", str(jax_file)]
    argv += ["--set", 'block_pattern=["gdn2", "swa"]']
    assert convert.main(argv) == 0
    model = convert.load_jax(jax_file)
    assert model.config == cfg
    assert convert.main(["--to-torch", str(jax_file), "--out", str(out)]) == 0
    _assert_same(convert.load_torch_file(out), sd)
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        convert.main(["--from-torch", str(tmp_path / "lit.pth"), "--out", str(out)])  # no config


@pytest.fixture
def lit_file(tmp_path):
    path = tmp_path / "lit.pth"
    convert.save_torch_file(convert.lm_state_dict(CausalLM(TINY_CFG, rngs=nnx.Rngs(0))), path)
    return path


TINY_CFG = ModelConfig.preset("tiny")


def test_cli_set_parses_by_field_type(lit_file, tmp_path):
    """`--set allow_neg_eigval=False` is the bool False (a JSON-or-string parse stored the
    truthy string 'False', doubling b), and tuples take train.py's `a,b` syntax."""
    out = tmp_path / "model.safetensors"
    argv = ["--from-torch", str(lit_file), "--config", "tiny", "--out", str(out)]
    assert convert.main([*argv, "--set", "allow_neg_eigval=False"]) == 0
    assert convert.load_jax(out).config == TINY_CFG
    assert convert.main([*argv, "--set", "allow_neg_eigval=true"]) == 0
    assert convert.load_jax(out).config.allow_neg_eigval is True
    cfg = convert.config_from_args("tiny", ["block_pattern=gdn2,gdn2"])
    assert cfg.block_pattern == ("gdn2", "gdn2")


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("hidden_size=abc", "hidden_size=abc: expected an int, got 'abc'"),
        ("hidden_size=64.5", "hidden_size=64.5: expected an int"),
        ("allow_neg_eigval=1", "allow_neg_eigval=1: expected true or false"),
        ("output_gate=relu", "output_gate=relu: 'relu' is not one of"),
        ("hidden=64", "unknown config key 'hidden'"),
    ],
)
def test_cli_config_errors_exit_2_with_one_error_line(override, names, lit_file, tmp_path, capsys):
    out = tmp_path / "model.safetensors"
    argv = ["--from-torch", str(lit_file), "--config", "tiny", "--out", str(out)]
    assert convert.main([*argv, "--set", override]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and names in lines[0], lines
    assert not out.exists()


def test_cli_to_torch_of_a_torch_file_says_what_it_expects(lit_file, tmp_path, capsys):
    """Not safetensors' "header too large": the argument, and what it must be."""
    assert convert.main(["--to-torch", str(lit_file), "--out", str(tmp_path / "x.pth")]) == 2
    err = capsys.readouterr().err
    assert f"error: {lit_file}: a gdn2_jax model file is a .safetensors file" in err
    renamed = lit_file.rename(tmp_path / "lit.safetensors")
    assert convert.main(["--to-torch", str(renamed), "--out", str(tmp_path / "x.pth")]) == 2
    assert f"error: {renamed} is not a readable safetensors file" in capsys.readouterr().err


def test_cli_runs_as_a_module(tmp_path):
    cfg = ModelConfig.preset("tiny")
    convert.save_jax(CausalLM(cfg, rngs=nnx.Rngs(0)), tmp_path / "m.safetensors")
    cmd = [sys.executable, "-m", "gdn2_jax.convert", "--to-torch", str(tmp_path / "m.safetensors")]
    cmd += ["--out", str(tmp_path / "lit.safetensors")]
    subprocess.run(cmd, check=True, capture_output=True, env=os.environ | {"JAX_PLATFORMS": "cpu"})
    expected = convert.lm_state_dict(convert.load_jax(tmp_path / "m.safetensors"))
    _assert_same(convert.load_torch_file(tmp_path / "lit.safetensors"), expected)
