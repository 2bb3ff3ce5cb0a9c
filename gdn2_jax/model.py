"""GDN-2 causal language models: recurrent (GDN-2 mixers only) and hybrid (GDN-2 + SWA).

A model is embeddings, pre-norm blocks `x + mixer(norm_1 x)`, `x + SwiGLU(norm_2 x)`, a final
RMSNorm and a tied or untied head. `ModelConfig.block_pattern` names each block's mixer:
"gdn2", "swa" (sliding-window attention) or "attn" (full attention). Layout and initialization
follow NVIDIA's lit_gpt `GPT`, so `gdn2_jax.convert` maps checkpoints one-to-one.
"""

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gdn2_jax.layers import Attention, GatedDeltaRule2, RMSNorm, SwiGLU
from gdn2_jax.layers.attention import IMPLEMENTATIONS
from gdn2_jax.layers.gdn2 import BACKENDS, GATE_MODES
from gdn2_jax.layers.init import partitioned, torch_linear_init
from gdn2_jax.layers.norm import OUTPUT_GATES

MIXERS = ("gdn2", "swa", "attn")
DTYPES = ("float32", "bfloat16", "float16")
EMBED_INIT_STD = 0.02  # lit_gpt's `mamba_init` embedding


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a causal LM. Presets: `ModelConfig.preset(name, **overrides)`."""

    vocab_size: int = 32000
    hidden_size: int = 2304
    block_pattern: tuple[str, ...] = ("gdn2",) * 18
    intermediate_size: int = 6208
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    # GDN-2 mixers
    gdn2_num_heads: int = 16
    gdn2_head_dim: int = 128
    gdn2_num_v_heads: int | None = None
    gdn2_expand_v: float = 1.0
    conv_size: int = 4
    allow_neg_eigval: bool = False
    output_gate: str = "silu"
    gate_mode: str = "gdn2"
    gdn2_backend: str = "auto"
    chunk_size: int = 64
    # attention mixers ("swa", "attn")
    attn_num_heads: int = 18
    attn_num_kv_heads: int | None = None
    window_size: int = 2048
    rope_theta: float = 10000.0
    attn_implementation: str = "auto"
    # numerics and memory
    max_seq_len: int = 4096
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False

    def __post_init__(self):
        _validate(self)

    @property
    def num_layers(self) -> int:
        return len(self.block_pattern)

    @property
    def attn_head_dim(self) -> int:
        return self.hidden_size // self.attn_num_heads

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """A named configuration (see `PRESETS`), with fields replaced by `overrides`."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        d["block_pattern"] = tuple(d["block_pattern"])
        return cls(**d)


def _check_choice(name: str, value, allowed):
    if value not in allowed:
        raise ValueError(f"ModelConfig.{name} must be one of {allowed}, got {value!r}")


def _check_positive(cfg: ModelConfig, *names: str):
    for name in names:
        if getattr(cfg, name) <= 0:
            raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(cfg, name)}")


def _validate(cfg: ModelConfig):
    _check_positive(cfg, "vocab_size", "hidden_size", "intermediate_size", "norm_eps")
    _check_positive(cfg, "gdn2_num_heads", "gdn2_head_dim", "conv_size", "max_seq_len")
    if not isinstance(cfg.block_pattern, tuple) or not cfg.block_pattern:
        raise ValueError(
            f"ModelConfig.block_pattern must be a non-empty tuple, got {cfg.block_pattern!r}"
        )
    for kind in cfg.block_pattern:
        _check_choice("block_pattern", kind, MIXERS)
    for name, allowed in (
        ("output_gate", OUTPUT_GATES),
        ("gate_mode", GATE_MODES),
        ("gdn2_backend", BACKENDS),
        ("attn_implementation", IMPLEMENTATIONS),
        ("dtype", DTYPES),
        ("param_dtype", DTYPES),
    ):
        _check_choice(name, getattr(cfg, name), allowed)
    if any(kind != "gdn2" for kind in cfg.block_pattern):
        _check_positive(cfg, "attn_num_heads", "window_size")
        if cfg.hidden_size % cfg.attn_num_heads:
            raise ValueError(
                f"ModelConfig.attn_num_heads={cfg.attn_num_heads} must divide "
                f"hidden_size={cfg.hidden_size}"
            )
        kv = cfg.attn_num_kv_heads
        if kv is not None and (kv < 1 or cfg.attn_num_heads % kv):
            raise ValueError(f"ModelConfig.attn_num_kv_heads={kv} must divide attn_num_heads")


class Block(nnx.Module):
    """Pre-norm residual block: x + mixer(norm_1 x), then + SwiGLU(norm_2 x)."""

    def __init__(self, cfg: ModelConfig, kind: str, *, rngs: nnx.Rngs):
        dt, pdt = cfg.compute_dtype, jnp.dtype(cfg.param_dtype)
        # lit_gpt (mamba_init) shrinks residual-branch output layers by √(2 · layers).
        out_scale = 1.0 / math.sqrt(2 * cfg.num_layers)
        self.kind = kind
        self.norm_1 = RMSNorm(
            cfg.hidden_size, eps=cfg.norm_eps, dtype=dt, param_dtype=pdt, rngs=rngs
        )
        self.mixer = _make_mixer(cfg, kind, out_scale, rngs)
        self.norm_2 = RMSNorm(
            cfg.hidden_size, eps=cfg.norm_eps, dtype=dt, param_dtype=pdt, rngs=rngs
        )
        self.mlp = SwiGLU(
            cfg.hidden_size,
            cfg.intermediate_size,
            out_scale=out_scale,
            dtype=dt,
            param_dtype=pdt,
            rngs=rngs,
        )

    def __call__(self, x, segment_ids=None):
        x = x + self.mixer(self.norm_1(x), segment_ids=segment_ids)
        return x + self.mlp(self.norm_2(x))

    def prefill(self, x, *, max_len: int):
        if self.kind == "gdn2":
            h, cache = self.mixer.prefill(self.norm_1(x))
        else:
            h, cache = self.mixer.prefill(self.norm_1(x), max_len=max_len)
        x = x + h
        return x + self.mlp(self.norm_2(x)), cache

    def step(self, x_t, cache):
        h, cache = self.mixer.step(self.norm_1(x_t), cache)
        x_t = x_t + h
        return x_t + self.mlp(self.norm_2(x_t)), cache


def _make_mixer(cfg: ModelConfig, kind: str, out_scale: float, rngs: nnx.Rngs):
    dt, pdt = cfg.compute_dtype, jnp.dtype(cfg.param_dtype)
    if kind == "gdn2":
        return GatedDeltaRule2(
            cfg.hidden_size,
            cfg.gdn2_num_heads,
            cfg.gdn2_head_dim,
            expand_v=cfg.gdn2_expand_v,
            num_v_heads=cfg.gdn2_num_v_heads,
            conv_size=cfg.conv_size,
            allow_neg_eigval=cfg.allow_neg_eigval,
            output_gate=cfg.output_gate,
            norm_eps=cfg.norm_eps,
            gate_mode=cfg.gate_mode,
            backend=cfg.gdn2_backend,
            chunk_size=cfg.chunk_size,
            dtype=dt,
            param_dtype=pdt,
            rngs=rngs,
        )
    return Attention(
        cfg.hidden_size,
        cfg.attn_num_heads,
        num_kv_heads=cfg.attn_num_kv_heads,
        window_size=cfg.window_size if kind == "swa" else None,
        rope_theta=cfg.rope_theta,
        implementation=cfg.attn_implementation,
        out_scale=out_scale,
        dtype=dt,
        param_dtype=pdt,
        rngs=rngs,
    )


class CausalLM(nnx.Module):
    """tokens [B, T] int32 -> logits [B, T, vocab] float32."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        cfg = config
        self.config = cfg
        pdt = jnp.dtype(cfg.param_dtype)
        embed_init = jax.nn.initializers.normal(EMBED_INIT_STD)
        self.wte = nnx.Param(
            partitioned(embed_init, ("vocab", "embed"))(
                rngs.params(), (cfg.vocab_size, cfg.hidden_size), pdt
            )
        )
        self.blocks = nnx.List([Block(cfg, kind, rngs=rngs) for kind in cfg.block_pattern])
        self.ln_f = RMSNorm(
            cfg.hidden_size, eps=cfg.norm_eps, dtype=cfg.compute_dtype, param_dtype=pdt, rngs=rngs
        )
        head_init = partitioned(torch_linear_init(), ("embed", "vocab"))
        self.lm_head = (
            nnx.data(None)
            if cfg.tie_embeddings
            else nnx.Param(head_init(rngs.params(), (cfg.hidden_size, cfg.vocab_size), pdt))
        )

    def embed(self, tokens):
        return jnp.take(self.wte[...], tokens, axis=0).astype(self.config.compute_dtype)

    def logits(self, x):
        """Final norm and head; float32 logits whatever the compute dtype."""
        x = self.ln_f(x)
        head = self.wte[...].T if self.lm_head is None else self.lm_head[...]
        return jnp.einsum(
            "...d,dv->...v", x, head.astype(x.dtype), preferred_element_type=jnp.float32
        )

    def __call__(self, tokens, *, segment_ids=None):
        """tokens [B, T] -> logits [B, T, vocab]; `segment_ids` [B, T] separates packed documents.

        Tokens of different segment ids never interact (0 marks padding, which forms its own
        segment); every mixer's state and attention restart where the id changes.
        """
        x = self.embed(tokens)
        for block in self.blocks:
            if self.config.remat:
                x = nnx.remat(lambda blk, h, seg: blk(h, seg))(block, x, segment_ids)
            else:
                x = block(x, segment_ids)
        return self.logits(x)

    def prefill(self, tokens, *, max_len: int):
        """Chunk path over a prompt [B, T] -> (logits [B, T, vocab], per-block caches).

        `max_len` bounds prompt plus generated tokens: it sizes full-attention KV buffers.
        """
        x = self.embed(tokens)
        caches = []
        for block in self.blocks:
            x, cache = block.prefill(x, max_len=max_len)
            caches.append(cache)
        return self.logits(x), tuple(caches)

    def decode_step(self, token, caches):
        """One token [B] int32 after the cached context -> (logits [B, vocab], caches)."""
        x = self.embed(token)
        new = []
        for block, cache in zip(self.blocks, caches, strict=True):
            x, cache = block.step(x, cache)
            new.append(cache)
        return self.logits(x), tuple(new)


def count_params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _hybrid(num_layers: int, **kw) -> ModelConfig:
    # lit_gpt's `gdn2_per_layer=2`: even blocks GDN-2, odd blocks sliding-window attention.
    return ModelConfig(block_pattern=("gdn2", "swa") * (num_layers // 2), **kw)


PRESETS: dict[str, ModelConfig] = {
    # The paper's 1.3B models (NVIDIA lit_gpt `gdn2_1.3B` and `swa_gdn2_1.3B`).
    "gdn2-1.3b": ModelConfig(),
    "hybrid-1.3b": _hybrid(18, intermediate_size=6784),
    # lit_gpt's small recurrent and hybrid models.
    "gdn2-100m": ModelConfig(
        hidden_size=768, block_pattern=("gdn2",) * 12, intermediate_size=2048,
        gdn2_num_heads=12, gdn2_head_dim=64, attn_num_heads=12,
    ),
    "gdn2-305m": ModelConfig(
        hidden_size=1024, block_pattern=("gdn2",) * 12, intermediate_size=4352,
        gdn2_num_heads=16, gdn2_head_dim=64, attn_num_heads=16,
    ),
    "hybrid-100m": _hybrid(
        12, hidden_size=768, intermediate_size=2048, gdn2_num_heads=4, gdn2_head_dim=64,
        attn_num_heads=12,
    ),
    # CPU-sized models for tests and smoke runs.
    "tiny": ModelConfig(
        vocab_size=256, hidden_size=64, block_pattern=("gdn2",) * 2, intermediate_size=128,
        gdn2_num_heads=2, gdn2_head_dim=32, attn_num_heads=2, window_size=16, max_seq_len=256,
    ),
    "tiny-hybrid": _hybrid(
        2, vocab_size=256, hidden_size=64, intermediate_size=128, gdn2_num_heads=2,
        gdn2_head_dim=32, attn_num_heads=2, window_size=16, max_seq_len=256,
    ),
    "small": ModelConfig(
        vocab_size=32000, hidden_size=256, block_pattern=("gdn2",) * 4, intermediate_size=768,
        gdn2_num_heads=4, gdn2_head_dim=64, attn_num_heads=4, max_seq_len=1024,
    ),
    "small-hybrid": _hybrid(
        4, vocab_size=32000, hidden_size=256, intermediate_size=768, gdn2_num_heads=4,
        gdn2_head_dim=64, attn_num_heads=4, window_size=256, max_seq_len=1024,
    ),
}  # fmt: skip
