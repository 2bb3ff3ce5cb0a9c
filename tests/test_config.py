"""Config files load, overrides parse into the declared types, and mistakes fail loudly."""

from pathlib import Path

import pytest

from gdn2_jax.config import (
    Config,
    ConfigError,
    apply_overrides,
    diff,
    load_config,
    to_dict,
)
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
        ("optimizer.lr=fast", r"optimizer.lr: expected float, got 'fast'"),
        ("train.steps=2.5", r"train.steps: expected int"),
        ("data.shuffle=maybe", r"expected true or false"),
        ("data.kind=images", r"'images' is not one of"),
        ("optimizer=3", r"is a section"),
        ("optimizer.lr.x=3", r"is a value, not a section"),
        ("optimizer.lr", r"not of the form"),
    ],
)
def test_bad_overrides_are_clear_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides(Config(), [override])


def test_model_config_validation_still_applies():
    with pytest.raises(ValueError, match="block_pattern"):
        apply_overrides(Config(), ["model.block_pattern=(gdn2,mamba)"])


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
