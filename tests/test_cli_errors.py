"""Config mistakes on every command line end in one `error:` line that names the key, with exit
status 2 and no traceback; an error after training started shuts down without tracebacks from
threads at exit; messages read as sentences. (The convert and evaluate commands:
`tests/test_convert.py`, `tests/test_evaluate.py`.)"""

import math

import pytest
from train_testing import DEFAULT_CONFIG, run_python, tiny_overrides

import train
from gdn2_jax import trainer
from gdn2_jax.checkpoint import Checkpointer
from gdn2_jax.config import CheckpointConfig


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("model.hidden_size=abc", "model.hidden_size=abc: expected an int"),
        ("model.hidden_size=64.5", "model.hidden_size=64.5: expected an int"),
        ("model.allow_neg_eigval=1", "model.allow_neg_eigval=1: expected true or false"),
        ("model.block_pattern=gdn2,mamba", "model.block_pattern=gdn2,mamba: 'mamba' is not"),
        ("model.gdn2_head_dim=0", "model.gdn2_head_dim=0: ModelConfig.gdn2_head_dim must be"),
        ("eval.num_batches=0", "eval.num_batches=0: EvalConfig.num_batches must be > 0"),
        ("model.max_seq_len=64", "model.max_seq_len=64: ModelConfig.max_seq_len was removed"),
        ("optimizer.grad_accum_steps=3", "optimizer.grad_accum_steps=3 micro-batches"),
        ("data.recall.vocab_size=64", "but model.vocab_size=32"),
    ],
)
def test_train_config_errors_exit_2_with_one_error_line(override, names, tmp_path, capsys):
    argv = ["--config", str(DEFAULT_CONFIG)]
    argv += [f"--set={o}" for o in tiny_overrides(tmp_path / "run", override)]
    assert train.main(argv) == 2
    assert names in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_train_config_file_building_a_bad_model_config_is_an_error_line(tmp_path, capsys):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from gdn2_jax.config import Config\n"
        "from gdn2_jax.model_config import ModelConfig\n"
        "def get_config():\n"
        "    return Config(model=ModelConfig(tie_embeddings=2))\n"
    )
    assert train.main(["--config", str(bad)]) == 2
    assert "ModelConfig.tie_embeddings must be a bool, got 2" in _one_error_line(
        capsys.readouterr().err
    )


FAIL_AFTER_STARTUP = """
import sys
import train
from gdn2_jax import trainer

def restore_or_init(*args):
    raise RuntimeError("injected failure after the writers opened")

trainer.restore_or_init = restore_or_init
sys.exit(train.main(sys.argv[1:]))
"""


def test_error_after_startup_leaves_no_tracebacks_at_exit(tmp_path):
    """With TensorBoard, async checkpointing and data workers open, a failure prints its own
    traceback and nothing else: no "Exception ignored" from tensorboardX's exit hook, no
    thread tracebacks."""
    overrides = tiny_overrides(
        tmp_path, "logging.tensorboard=true", "checkpoint.async_save=true", "data.num_workers=1"
    )
    argv = ["-c", FAIL_AFTER_STARTUP, "--config", str(DEFAULT_CONFIG)]
    result = run_python(argv + [f"--set={o}" for o in overrides], timeout=300)
    assert result.returncode == 1
    assert "RuntimeError: injected failure after the writers opened" in result.stderr
    assert result.stderr.count("Traceback") == 1, result.stderr
    assert "Exception ignored" not in result.stderr and "Exception in thread" not in result.stderr


def test_divergence_before_any_checkpoint_says_none_is_intact(tmp_path):
    """Not "the last good checkpoint is none was saved."."""
    ckpt = Checkpointer(tmp_path / "checkpoints", CheckpointConfig(async_save=False))
    try:
        with pytest.raises(trainer.TrainingDivergedError) as raised:
            trainer.check_finite(3, {"loss": math.nan, "grad_norm": 1.0}, ckpt)
    finally:
        ckpt.close()
    assert str(raised.value) == (
        "training diverged at step 3: {'loss': nan}. Stopped without saving; no intact "
        f"checkpoint is in {ckpt.directory}."
    )
