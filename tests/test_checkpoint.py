"""Checkpoints: exact resume, atomic saves, keep-N, and refusing an incompatible config."""

import json
import math
import os
import signal
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from train_testing import read_metrics, run_python, tiny_config

from gdn2_jax import data, trainer
from gdn2_jax.checkpoint import Checkpointer, IncompatibleCheckpointError
from gdn2_jax.config import CheckpointConfig, DataConfig

SMALL_DATA = DataConfig(batch_size=2, seq_len=64)


def _write_corpus(path):
    rng = np.random.default_rng(0)
    words = ["delta", "rule", "gate", "erase", "write", "state", "chunk", "decay"]
    lines = [" ".join(rng.choice(words, size=rng.integers(3, 30))) for _ in range(300)]
    path.write_text("\n".join(json.dumps({"text": t}) for t in lines))


def test_resume_reproduces_uninterrupted_losses(tmp_path):
    """Packed byte text with shuffling: N steps straight equal N/2, restore, N/2 bit for bit."""
    corpus = tmp_path / "corpus.jsonl"
    _write_corpus(corpus)
    text = ("data.kind=text", f"data.paths={corpus}", "model.vocab_size=257", "train.steps=6")
    trainer.train(tiny_config(tmp_path / "straight", *text))
    resumed_cfg = tiny_config(tmp_path / "resumed", *text)
    first = trainer.train(resumed_cfg, until=3)
    assert first["step"] == 3
    second = trainer.train(resumed_cfg)
    straight = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "straight")]
    resumed = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "resumed")]
    assert [s for s, _ in straight] == [1, 2, 3, 4, 5, 6]
    assert resumed == straight
    straight_eval = read_metrics(tmp_path / "straight", "eval")[-1]
    assert second["eval"]["loss"] == straight_eval["loss"]


def test_incompatible_config_is_refused(tmp_path):
    trainer.train(tiny_config(tmp_path), until=1)
    wider = "model.hidden_size=64"
    # The stored arrays name the mismatch: the embedding is [vocab, 32], the run wants [vocab, 64].
    with pytest.raises(IncompatibleCheckpointError, match=r"params\.wte: float32\[32, 32\] != "):
        trainer.train(tiny_config(tmp_path, wider))
    with pytest.raises(IncompatibleCheckpointError, match=r"data\.seq_len: 32 != 48"):
        trainer.train(tiny_config(tmp_path, "data.seq_len=48"))
    # Starting over in the same workdir is allowed when asked for.
    fresh = trainer.train(tiny_config(tmp_path, wider, "checkpoint.resume=false"), until=0)
    assert fresh["step"] == 0 and math.isfinite(fresh["eval"]["loss"])


def test_computation_only_changes_resume_and_are_logged(tmp_path, caplog):
    """Backends, remat and the compute dtype change no stored array: the run resumes."""
    trainer.train(tiny_config(tmp_path), until=1)
    how = ("model.gdn2_backend=scan", "model.remat=true", "model.dtype=bfloat16")
    with caplog.at_level("WARNING", logger="gdn2_jax.checkpoint"):
        resumed = trainer.train(tiny_config(tmp_path, *how), until=2)
    assert resumed["step"] == 2
    logged = caplog.text
    assert "model.gdn2_backend: 'xla' != 'scan'" in logged
    assert "model.remat: False != True" in logged
    assert "model.dtype: 'float32' != 'bfloat16'" in logged


def _save(ckpt, step, value, iterator):
    ckpt.save(step, {"w": jnp.full((4,), float(value))}, iterator, {"step": step})


def test_keeps_the_newest_n(tmp_path):
    ckpt = Checkpointer(tmp_path, CheckpointConfig(keep=2, async_save=True))
    it = data.make_train_iterator(SMALL_DATA)
    for step in range(1, 5):
        next(it)
        _save(ckpt, step, step, it)
    ckpt.wait()
    assert ckpt.all_steps() == [3, 4]
    ckpt.close()


def _killed_save(directory: str) -> None:
    """Child process: a complete checkpoint at step 1, then SIGKILL while step 2 is being
    written by orbax's background thread (the save call returns once arrays are off-device)."""
    ckpt = Checkpointer(directory, CheckpointConfig(keep=3, async_save=True))
    it = data.make_train_iterator(SMALL_DATA)
    next(it)
    _save(ckpt, 1, 1, it)
    ckpt.wait()
    next(it)
    # Big enough that writing it takes far longer than reaching the kill below.
    big = {"w": jnp.full((4,), 2.0), "pad": jnp.ones((16, 1024, 1024))}
    ckpt.save(2, big, it, {"step": 2})
    print(json.dumps(sorted(os.listdir(directory))), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def test_save_killed_midway_leaves_previous_checkpoint(tmp_path):
    child = run_python([__file__, "killed-save", str(tmp_path)])
    assert child.returncode == -signal.SIGKILL, child.stderr
    on_disk = json.loads(child.stdout.strip().splitlines()[-1])
    # The step-2 save had started (its temporary directory existed) but never committed.
    assert "1" in on_disk and "2" not in on_disk
    assert any(name.startswith("2.orbax-checkpoint-tmp") for name in os.listdir(tmp_path))
    ckpt = Checkpointer(tmp_path, CheckpointConfig(keep=3))
    assert ckpt.latest_step() == 1
    it = data.make_train_iterator(SMALL_DATA)
    state = ckpt.restore(1, {"w": jnp.zeros((4,))}, it, {"step": 1})
    np.testing.assert_array_equal(state["w"], np.ones(4))
    # The iterator resumes after the one batch consumed before step 1 was saved.
    reference = data.make_train_iterator(SMALL_DATA)
    next(reference)
    np.testing.assert_array_equal(next(it)["inputs"], next(reference)["inputs"])
    ckpt.close()


if __name__ == "__main__":
    if sys.argv[1] == "killed-save":
        _killed_save(sys.argv[2])
