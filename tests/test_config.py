"""Config files load, overrides parse into the declared types, and mistakes fail loudly."""

from pathlib import Path

import pytest

from gdn2_jax.config import (
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    EvalConfig,
    LoggingConfig,
    MeshConfig,
    OptimizerConfig,
    RecallConfig,
    TrainConfig,
    apply_overrides,
    diff,
    from_dict,
    load_config,
    to_dict,
)
from gdn2_jax.generate import SamplingConfig
from gdn2_jax.model_config import ModelConfig

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.py"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_file_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.model.vocab_size >= 1 and cfg.data.batch_size >= 1


def test_overrides_parse_to_field_types():
    cfg = apply_overrides(
        Config(),
        [
            "optimizer.lr=3e-4",
            "train.steps=1e3",
            "data.recall.num_pairs=4",
            "data.shuffle=false",
            "data.paths=a.txt,b.txt",
            "data.recall.variant=needle",
            "model.gdn2_num_v_heads=none",
            "model.block_pattern=(gdn2,swa)",
            "train.workdir=runs/x=1",
        ],
    )
    assert cfg.optimizer.lr == 3e-4 and isinstance(cfg.optimizer.lr, float)
    assert cfg.train.steps == 1000 and isinstance(cfg.train.steps, int)
    assert cfg.data.recall.num_pairs == 4
    assert cfg.data.shuffle is False
    assert cfg.data.paths == ("a.txt", "b.txt")
    assert cfg.data.recall.variant == "needle"
    assert cfg.model.gdn2_num_v_heads is None
    assert cfg.model.block_pattern == ("gdn2", "swa")
    assert cfg.train.workdir == "runs/x=1"
    assert apply_overrides(Config(), ["model.gdn2_num_v_heads=8"]).model.gdn2_num_v_heads == 8


@pytest.mark.parametrize(
    "override,match",
    [
        ("optimizer.weight_decy=1", r"unknown config key.*did you mean 'weight_decay'"),
        ("optimizer.learning_rate=1", r"has no field 'learning_rate' \(fields: lr, "),
        ("optimiser.lr=1", r"Config has no field 'optimiser'.*did you mean 'optimizer'"),
        ("optimizer.lr=fast", r"^optimizer.lr=fast: expected a float, got 'fast'$"),
        ("train.steps=2.5", r"^train.steps=2.5: expected an int"),
        ("data.shuffle=maybe", r"^data.shuffle=maybe: expected true or false"),
        ("data.shuffle=1", r"^data.shuffle=1: expected true or false, got '1'"),
        ("model.hidden_size=abc", r"^model.hidden_size=abc: expected an int, got 'abc'"),
        ("model.gdn2_num_v_heads=2.5", r"^model.gdn2_num_v_heads=2.5: expected an int or None"),
        ("model.output_gate=relu", r"^model.output_gate=relu: 'relu' is not one of 'silu'"),
        ("model.block_pattern=gdn2,mamba", r"^model.block_pattern=gdn2,mamba: 'mamba' is not one"),
        ("model.hidden_size=0", r"^model.hidden_size=0: ModelConfig.hidden_size must be > 0"),
        ("eval.num_batches=0", r"^eval.num_batches=0: EvalConfig.num_batches must be > 0"),
        ("mesh.data=0", r"^mesh.data=0: MeshConfig.data must be a device count"),
        ("data.kind=images", r"'images' is not one of"),
        ("optimizer=3", r"is a section"),
        ("optimizer.lr.x=3", r"is a value, not a section"),
        ("optimizer.lr", r"not of the form"),
    ],
)
def test_bad_overrides_are_clear_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides(Config(), [override])


def test_bool_overrides_accept_true_and_false_in_any_case():
    cfg = apply_overrides(Config(), ["model.allow_neg_eigval=True", "data.shuffle=FALSE"])
    assert cfg.model.allow_neg_eigval is True and cfg.data.shuffle is False


def test_cross_field_model_errors_name_the_override_key():
    with pytest.raises(ConfigError, match=r"^model.attn_num_heads=5: .*must divide hidden_size"):
        apply_overrides(Config(), ["model.block_pattern=gdn2,swa", "model.attn_num_heads=5"])


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("allow_neg_eigval", "False", r"allow_neg_eigval must be a bool, got 'False' \(str\)"),
        ("tie_embeddings", 2, r"tie_embeddings must be a bool, got 2 \(int\)"),
        ("hidden_size", 64.5, r"hidden_size must be an int, got 64.5 \(float\)"),
        ("hidden_size", True, r"hidden_size must be an int, got True \(bool\)"),
        ("norm_eps", "1e-5", r"norm_eps must be a float, got '1e-5'"),
        ("block_pattern", ["gdn2"], r"block_pattern must be a tuple"),
        ("block_pattern", ("gdn2", "mamba"), r"block_pattern must be a tuple whose items are"),
        ("gdn2_num_v_heads", 4.0, r"gdn2_num_v_heads must be an int or None"),
        ("output_gate", "relu", r"output_gate must be one of 'silu', 'sigmoid'"),
    ],
)
def test_model_config_checks_field_types_at_construction(field, value, match):
    with pytest.raises(ConfigError, match=r"^ModelConfig\." + match):
        ModelConfig(**{field: value})


@pytest.mark.parametrize(
    ("cls", "field", "value"),
    [
        (RecallConfig, "num_pairs", "16"),
        (DataConfig, "seq_len", 64.0),
        (DataConfig, "kind", "images"),
        (DataConfig, "paths", ["a.txt"]),
        (OptimizerConfig, "lr", "3e-4"),
        (MeshConfig, "data", 1.5),
        (CheckpointConfig, "resume", "false"),
        (LoggingConfig, "progress_bar", 1),
        (EvalConfig, "num_batches", 8.0),
        (TrainConfig, "workdir", 3),
        (Config, "model", {}),
        (SamplingConfig, "temperature", "hot"),
    ],
)
def test_every_config_dataclass_checks_field_types(cls, field, value):
    with pytest.raises(ConfigError, match=rf"^{cls.__name__}\.{field} must be "):
        cls(**{field: value})


def test_float_fields_take_ints():
    assert OptimizerConfig(lr=1).lr == 1 and ModelConfig(rope_theta=10000).rope_theta == 10000


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (EvalConfig, {"num_batches": 0}, r"EvalConfig.num_batches must be > 0, got 0"),
        (DataConfig, {"batch_size": 0}, r"DataConfig.batch_size must be > 0"),
        (DataConfig, {"eval_fraction": 1.0}, r"DataConfig.eval_fraction must be in \[0, 1\)"),
        (OptimizerConfig, {"b2": 1.0}, r"OptimizerConfig.b2 must be in \[0, 1\)"),
        (OptimizerConfig, {"grad_accum_steps": 0}, r"grad_accum_steps must be > 0"),
        (MeshConfig, {"data": -1, "fsdp": -1}, r"only one axis may be -1, got data, fsdp"),
        (CheckpointConfig, {"keep": 0}, r"CheckpointConfig.keep must be > 0"),
        (TrainConfig, {"process_id": 2, "num_processes": 2}, r"process_id must be in \[0, "),
    ],
)
def test_out_of_range_values_are_refused_at_construction(cls, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        cls(**kwargs)


def test_max_seq_len_is_removed_and_old_configs_still_load():
    with pytest.raises(ConfigError, match=r"^model.max_seq_len=64: .*was removed"):
        apply_overrides(Config(), ["model.max_seq_len=64"])
    stored = to_dict(Config())
    stored["model"]["max_seq_len"] = 4096  # what checkpoints and model files of older runs hold
    assert from_dict(Config, stored) == Config()
    with pytest.raises(ConfigError, match="no field 'hidden'"):
        from_dict(Config, {"model": {"hidden": 3}})


def test_load_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.py")
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\n")
    with pytest.raises(ConfigError, match="must define get_config"):
        load_config(bad)
    wrong = tmp_path / "wrong.py"
    wrong.write_text("def get_config():\n    return {}\n")
    with pytest.raises(ConfigError, match="returned dict"):
        load_config(wrong)


def test_round_trip_dict_and_diff():
    a = to_dict(Config())
    b = to_dict(apply_overrides(Config(), ["optimizer.lr=1.0", "model.hidden_size=128"]))
    assert diff(a, a) == []
    changed = diff(a, b)
    assert len(changed) == 2
    assert any(c.startswith("model.hidden_size") for c in changed)


@pytest.mark.parametrize(
    ("name", "preset"), [("gdn2_1.3b.py", "gdn2-1.3b"), ("hybrid_1.3b.py", "hybrid-1.3b")]
)
def test_1_3b_configs_load_with_their_speed_settings(name, preset):
    cfg = load_config(Path(__file__).parent.parent / "configs" / name)
    assert cfg.model == ModelConfig.preset(preset, dtype="bfloat16", loss_chunks=8)
    assert cfg.data.seq_len == 4096 and cfg.data.batch_size == 128
    assert cfg.train.workdir == f"runs/{name.removesuffix('.py')}"
