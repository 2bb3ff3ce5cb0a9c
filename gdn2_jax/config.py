"""Training configuration: frozen dataclasses, config files and `--set a.b=value` overrides.

A config file is a Python file that defines `get_config()` returning a `Config`. Every key a
user can set is a declared dataclass field, so a typo fails loudly instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from gdn2_jax.model_config import ModelConfig
from gdn2_jax.typed_config import (
    ConfigError,
    apply_overrides,
    check_types,
    from_dict,
    parse_value,
    require,
    require_non_negative,
    require_positive,
)

# The override parser and dict loader live in typed_config, shared with every command line.
__all__ = [
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "LoggingConfig",
    "MeshConfig",
    "OptimizerConfig",
    "RecallConfig",
    "TrainConfig",
    "apply_overrides",
    "diff",
    "from_dict",
    "load_config",
    "parse_value",
    "to_dict",
]


@dataclasses.dataclass(frozen=True)
class RecallConfig:
    """Synthetic associative recall: key-value pairs, then queries whose answers are values.

    "mqar" is multi-query associative recall (all pairs up front, then `num_queries` queries).
    "needle" hides `num_pairs` key-value needles at random places in a haystack of filler
    tokens and asks for `num_queries` of them at the end (the multi-key needle variant: the
    needles not asked are distractors). "overwrite" is version recall: `num_pairs` keys are
    written, then `num_overwrites` more writes re-assign some of them new values, all in one
    shuffled stream; a query wants the key's latest value, so the old one must be erased.
    """

    variant: Literal["mqar", "needle", "overwrite"] = "mqar"
    vocab_size: int = 128
    num_pairs: int = 16
    num_queries: int = 16
    num_overwrites: int = 0

    def __post_init__(self):
        check_types(self)
        require_positive(self, "vocab_size", "num_pairs", "num_queries")
        require_non_negative(self, "num_overwrites")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where batches come from. `batch_size` is global: sequences per optimizer step."""

    kind: Literal["recall", "text", "tokens"] = "recall"
    seq_len: int = 128
    batch_size: int = 32
    seed: int = 0
    shuffle: bool = True
    # Worker processes that build batches; 0 builds them in the training process.
    num_workers: int = 0
    prefetch: int = 2
    recall: RecallConfig = RecallConfig()
    # kind="text": .txt (one document each), .jsonl[.gz|.zst] (one per line) or .parquet files.
    # kind="tokens": folders written by gdn2_jax.data.prepare (their held-out split is the eval
    # data), or flat token files (.npy, or raw .bin in `token_dtype`) with documents ended by
    # `eos_id`.
    paths: tuple[str, ...] = ()
    eval_paths: tuple[str, ...] = ()
    # Without eval_paths or a prepared held-out split, this tail fraction of the training
    # windows is held out for eval.
    eval_fraction: float = 0.005
    jsonl_field: str = "text"
    # A raw .bin's dtype; None takes it from the prepared metadata or the .npy file (a .bin
    # without metadata then is an error). When both are known they must agree.
    token_dtype: Literal["uint16", "uint32", "int32"] | None = None
    # None takes the end-of-document id from the prepared metadata (files without it then are
    # an error); when both are known they must agree.
    eos_id: int | None = None

    def __post_init__(self):
        check_types(self)
        require_positive(self, "seq_len", "batch_size")
        require_non_negative(self, "num_workers", "prefetch", "eos_id")
        require(self, "eval_fraction", 0 <= self.eval_fraction < 1, "in [0, 1)")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warm-up then cosine decay to `lr * final_lr_ratio`."""

    lr: float = 3e-3
    warmup_steps: int = 100
    final_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    # Micro-batches per step: the global batch is split and gradients summed before the update.
    grad_accum_steps: int = 1

    def __post_init__(self):
        check_types(self)
        require_non_negative(self, "lr", "warmup_steps", "final_lr_ratio", "weight_decay")
        require_non_negative(self, "clip_norm")
        require_positive(self, "eps", "grad_accum_steps")
        for name in ("b1", "b2"):
            require(self, name, 0 <= getattr(self, name) < 1, "in [0, 1)")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh. One axis may be -1: it takes all devices the others leave.

    `context` splits each sequence along its tokens (data.seq_len must divide by it).
    """

    data: int = -1
    fsdp: int = 1
    context: int = 1
    tensor: int = 1

    def __post_init__(self):
        check_types(self)
        for field in dataclasses.fields(self):
            size = getattr(self, field.name)
            require(self, field.name, size == -1 or size >= 1, "a device count >= 1, or -1")
        rest = [f.name for f in dataclasses.fields(self) if getattr(self, f.name) == -1]
        if len(rest) > 1:
            raise ConfigError(f"MeshConfig: only one axis may be -1, got {', '.join(rest)}")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 500
    keep: int = 3
    async_save: bool = True
    # Start from the newest intact checkpoint in the workdir when there is one.
    resume: bool = True
    # Starting over (resume=false) in a workdir that holds a run: "no" refuses, "move" moves
    # the old run (checkpoints, metrics, TensorBoard) into <workdir>/previous_runs/<UTC time>/,
    # "delete" removes it.
    overwrite: Literal["no", "move", "delete"] = "no"

    def __post_init__(self):
        check_types(self)
        require_positive(self, "keep")


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    every_steps: int = 10
    # False writes a line per log step instead (what a batch job's log shows of its progress).
    progress_bar: bool = True
    tensorboard: bool = True
    # Peak FLOP/s of one device for MFU; 0 looks the device up in a table (unknown -> no MFU).
    peak_flops_per_device: float = 0.0

    def __post_init__(self):
        check_types(self)
        require_non_negative(self, "peak_flops_per_device")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    every_steps: int = 200
    num_batches: int = 8

    def __post_init__(self):
        check_types(self)
        # Evaluation always runs at the end of training, so it needs at least one batch.
        require_positive(self, "num_batches")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    seed: int = 0
    workdir: str = "runs/default"
    # Join a multi-host job through jax.distributed.initialize (cluster auto-detection,
    # or the coordinator below when it is set).
    distributed: bool = False
    coordinator_address: str = ""
    num_processes: int = 1
    process_id: int = 0

    def __post_init__(self):
        check_types(self)
        require_positive(self, "steps", "num_processes")
        require(self, "process_id", 0 <= self.process_id < self.num_processes,
                f"in [0, num_processes={self.num_processes})")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def __post_init__(self):
        check_types(self)


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Runs the config file's `get_config()` and applies `a.b=value` overrides in order."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"_gdn2_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} must define get_config() returning a Config")
    cfg = module.get_config()
    if not isinstance(cfg, Config):
        raise ConfigError(f"{path}: get_config() returned {type(cfg).__name__}, not Config")
    return apply_overrides(cfg, overrides)


def to_dict(cfg: Any) -> dict:
    """JSON-friendly nested dict (dtypes and other objects become their string form)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Keys (dotted) whose values differ between two `to_dict` results."""
    out = []
    for k in sorted(set(a) | set(b)):
        key = f"{prefix}{k}"
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff(va, vb, key + ".")
        elif va != vb:
            out.append(f"{key}: {va!r} != {vb!r}")
    return out
