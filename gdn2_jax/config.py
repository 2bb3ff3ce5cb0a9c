"""Training configuration: frozen dataclasses, config files and `--set a.b=value` overrides.

A config file is a Python file that defines `get_config()` returning a `Config`. Every key a
user can set is a declared dataclass field, so a typo fails loudly instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from gdn2_jax.model_config import ModelConfig


class ConfigError(ValueError):
    """A config file or override that cannot be applied."""


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


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh. One axis may be -1: it takes all devices the others leave.

    `context` splits each sequence along its tokens (data.seq_len must divide by it).
    """

    data: int = -1
    fsdp: int = 1
    context: int = 1
    tensor: int = 1


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


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    every_steps: int = 10
    progress_bar: bool = True
    tensorboard: bool = True
    # Peak FLOP/s of one device for MFU; 0 looks the device up in a table (unknown -> no MFU).
    peak_flops_per_device: float = 0.0


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    every_steps: int = 200
    num_batches: int = 8


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


def apply_overrides(cfg: Any, overrides: Sequence[str]) -> Any:
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        cfg = _set_path(cfg, key.strip().split("."), raw.strip(), key.strip())
    return cfg


def _set_path(node: Any, parts: list[str], raw: str, full_key: str) -> Any:
    names = [f.name for f in dataclasses.fields(node)]
    name = parts[0]
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"unknown config key {full_key!r}: {type(node).__name__} has no field {name!r}"
            f" (fields: {', '.join(names)}){hint}"
        )
    current = getattr(node, name)
    if len(parts) > 1:
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"config key {full_key!r}: {name!r} is a value, not a section")
        return dataclasses.replace(node, **{name: _set_path(current, parts[1:], raw, full_key)})
    if dataclasses.is_dataclass(current):
        raise ConfigError(f"config key {full_key!r} is a section; set one of its fields")
    hint = typing.get_type_hints(type(node))[name]
    return dataclasses.replace(node, **{name: parse_value(raw, hint, full_key)})


def parse_value(raw: str, hint: Any, key: str) -> Any:
    """Parses the text of an override into a value of the field's declared type."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and raw.lower() == "none":
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return parse_value(raw, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: cannot parse {raw!r} as {hint}")
    if origin is Literal:
        if raw not in [str(a) for a in args]:
            raise ConfigError(f"{key}: {raw!r} is not one of {', '.join(map(repr, args))}")
        return next(a for a in args if str(a) == raw)
    if origin is tuple:
        return _parse_tuple(raw, args, key)
    if hint is bool:
        lowered = raw.lower()
        if lowered not in ("true", "false", "1", "0"):
            raise ConfigError(f"{key}: expected true or false, got {raw!r}")
        return lowered in ("true", "1")
    if hint is str:
        return raw
    if hint in (int, float):
        return _parse_number(raw, hint, key)
    raise ConfigError(f"{key}: fields of type {hint} cannot be set from the command line")


def _parse_number(raw: str, kind: type, key: str) -> int | float:
    try:
        value = float(raw) if kind is float else int(raw.replace("_", ""))
    except ValueError:
        try:
            as_float = float(raw)
        except ValueError:
            raise ConfigError(f"{key}: expected {kind.__name__}, got {raw!r}") from None
        if kind is int and as_float.is_integer():
            return int(as_float)
        raise ConfigError(f"{key}: expected {kind.__name__}, got {raw!r}") from None
    return value


def _parse_tuple(raw: str, args: tuple, key: str) -> tuple:
    """Accepts `a,b`, `(a, b)`, `[1, 2]` or `("a", "b")`; `()` is the empty tuple."""
    text = raw.strip()
    if text[:1] in "([" and text[-1:] in ")]":
        text = text[1:-1]
    items = [x.strip().strip("'\"") for x in text.split(",") if x.strip()]
    item_type = args[0] if args else str
    return tuple(parse_value(x, item_type, key) for x in items)


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


def from_dict(cls: type, d: dict) -> Any:
    """The dataclass `cls` rebuilt from a `to_dict` result (lists back to tuples); keys the
    dataclass does not declare are an error."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"{cls.__name__} has no field(s) {', '.join(unknown)}")
    kwargs = {}
    for name, value in d.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            kwargs[name] = from_dict(hint, value)
        elif isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)
