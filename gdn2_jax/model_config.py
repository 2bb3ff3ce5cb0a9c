"""`ModelConfig`, the architecture of a causal LM, and its named presets.

Pure Python: run configs import it without building (or importing) the model.
"""

import dataclasses
from typing import Any

from gdn2_jax.options import (
    ATTENTION_IMPLEMENTATIONS,
    CHUNK_BACKENDS,
    DECODE_MODES,
    DTYPES,
    GATE_MODES,
    MIXERS,
    OUTPUT_GATES,
    RECURRENT_BACKENDS,
    REMAT_POLICIES,
)


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
    # How the GDN-2 op computes (no effect on parameters): the chunk form's and the token-serial
    # form's implementations, and Pallas interpret mode (tests off a GPU).
    gdn2_backend: str = "auto"
    gdn2_recurrent_backend: str = "auto"
    gdn2_interpret: bool = False
    gdn2_decode: str = "auto"  # the decoding step: "auto", "fused" (one kernel), "unfused"
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
    # With remat, what each block keeps for the backward instead of recomputing it: "full"
    # keeps only the block's input; "dots" the matmul outputs; "gdn2_op" what the GDN-2 op's
    # backward reads (its forward kernels then run once); "dots_and_gdn2_op" both.
    remat_policy: str = "full"
    # The loss computes the head's logits for 1 / loss_chunks of each row's positions at a time
    # (1: all at once), so the [tokens, vocab] float32 logits are never held whole.
    loss_chunks: int = 1

    def __post_init__(self):
        _validate(self)

    @property
    def num_layers(self) -> int:
        return len(self.block_pattern)

    @property
    def attn_head_dim(self) -> int:
        return self.hidden_size // self.attn_num_heads

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
    _check_positive(cfg, "loss_chunks")
    if not isinstance(cfg.block_pattern, tuple) or not cfg.block_pattern:
        raise ValueError(
            f"ModelConfig.block_pattern must be a non-empty tuple, got {cfg.block_pattern!r}"
        )
    for kind in cfg.block_pattern:
        _check_choice("block_pattern", kind, MIXERS)
    for name, allowed in (
        ("output_gate", OUTPUT_GATES),
        ("gate_mode", GATE_MODES),
        ("gdn2_backend", CHUNK_BACKENDS),
        ("gdn2_recurrent_backend", RECURRENT_BACKENDS),
        ("gdn2_decode", DECODE_MODES),
        ("attn_implementation", ATTENTION_IMPLEMENTATIONS),
        ("dtype", DTYPES),
        ("param_dtype", DTYPES),
        ("remat_policy", REMAT_POLICIES),
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
