"""`ModelConfig`, the architecture of a causal LM, and its named presets.

Pure Python: run configs import it without building (or importing) the model.
"""

import dataclasses
from typing import Any, ClassVar, Literal

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
from gdn2_jax.typed_config import (
    ConfigError,
    check_field_name,
    check_types,
    from_dict,
    require,
    require_positive,
)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a causal LM. Presets: `ModelConfig.preset(name, **overrides)`."""

    vocab_size: int = 32000
    hidden_size: int = 2304
    block_pattern: tuple[Literal[MIXERS], ...] = ("gdn2",) * 18
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
    output_gate: Literal[OUTPUT_GATES] = "silu"
    gate_mode: Literal[GATE_MODES] = "gdn2"
    # How the GDN-2 op computes (no effect on parameters): the chunk form's and the token-serial
    # form's implementations, and Pallas interpret mode (tests off a GPU).
    gdn2_backend: Literal[CHUNK_BACKENDS] = "auto"
    gdn2_recurrent_backend: Literal[RECURRENT_BACKENDS] = "auto"
    gdn2_interpret: bool = False
    # The decoding step: "fused" (one Pallas kernel), "unfused", or "auto" (fused where it can
    # run, which is a GPU or interpret mode).
    gdn2_decode: Literal[DECODE_MODES] = "auto"
    # V columns of the state per program of the fused step (None: the kernel's default).
    gdn2_decode_block_v: int | None = None
    # Warps per program of the fused step (None: one per 2048 state elements of its tile).
    gdn2_decode_warps: int | None = None
    chunk_size: int = 64
    # attention mixers ("swa", "attn")
    attn_num_heads: int = 18
    attn_num_kv_heads: int | None = None
    window_size: int = 2048
    rope_theta: float = 10000.0
    attn_implementation: Literal[ATTENTION_IMPLEMENTATIONS] = "auto"
    # numerics and memory
    dtype: Literal[DTYPES] = "float32"
    param_dtype: Literal[DTYPES] = "float32"
    remat: bool = False
    # With remat, what each block keeps for the backward instead of recomputing it: "full"
    # keeps only the block's input; "dots" the matmul outputs; "gdn2_op" what the GDN-2 op's
    # backward reads (its forward kernels then run once); "dots_and_gdn2_op" both.
    remat_policy: Literal[REMAT_POLICIES] = "full"
    # The loss computes the head's logits for 1 / loss_chunks of each row's positions at a time
    # (1: all at once), so the [tokens, vocab] float32 logits are never held whole.
    loss_chunks: int = 1

    # Fields older versions had; stored configs that carry them still load (they are dropped).
    REMOVED_FIELDS: ClassVar[dict[str, str]] = {
        "max_seq_len": "it limited nothing (RoPE and the GDN-2 state take any length); drop it",
    }

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
            raise ConfigError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        for key in overrides:
            check_field_name(cls, key, key)
        return dataclasses.replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """From `to_dict` output or a JSON object of fields (lists become tuples)."""
        return from_dict(cls, d)


def _validate(cfg: ModelConfig):
    check_types(cfg)
    require_positive(cfg, "vocab_size", "hidden_size", "intermediate_size", "norm_eps")
    require_positive(cfg, "gdn2_num_heads", "gdn2_head_dim", "gdn2_expand_v", "conv_size")
    require_positive(cfg, "chunk_size", "loss_chunks")
    require(cfg, "block_pattern", len(cfg.block_pattern) > 0, "a non-empty tuple")
    if cfg.gdn2_num_v_heads is not None:
        require_positive(cfg, "gdn2_num_v_heads")
    if any(kind != "gdn2" for kind in cfg.block_pattern):
        require_positive(cfg, "attn_num_heads", "window_size", "rope_theta")
        if cfg.hidden_size % cfg.attn_num_heads:
            raise ConfigError(
                f"ModelConfig.attn_num_heads={cfg.attn_num_heads} must divide "
                f"hidden_size={cfg.hidden_size}"
            )
        kv = cfg.attn_num_kv_heads
        if kv is not None and (kv < 1 or cfg.attn_num_heads % kv):
            raise ConfigError(f"ModelConfig.attn_num_kv_heads={kv} must divide attn_num_heads")


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
        gdn2_num_heads=2, gdn2_head_dim=32, attn_num_heads=2, window_size=16,
    ),
    "tiny-hybrid": _hybrid(
        2, vocab_size=256, hidden_size=64, intermediate_size=128, gdn2_num_heads=2,
        gdn2_head_dim=32, attn_num_heads=2, window_size=16,
    ),
    "small": ModelConfig(
        vocab_size=32000, hidden_size=256, block_pattern=("gdn2",) * 4, intermediate_size=768,
        gdn2_num_heads=4, gdn2_head_dim=64, attn_num_heads=4,
    ),
    "small-hybrid": _hybrid(
        4, vocab_size=32000, hidden_size=256, intermediate_size=768, gdn2_num_heads=4,
        gdn2_head_dim=64, attn_num_heads=4, window_size=256,
    ),
}  # fmt: skip
