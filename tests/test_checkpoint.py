"""Checkpoints: exact resume, atomic saves, keep-N, refusing an incompatible config, integrity
manifests with fallback to the newest intact step, and never mixing with or destroying the run
already in a workdir."""

import json
import math
import os
import shutil
import signal
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from train_testing import DEFAULT_CONFIG, read_metrics, run_python, tiny_config, tiny_overrides

from gdn2_jax import data, manifest, metrics, trainer, workdir
from gdn2_jax.checkpoint import Checkpointer, DamagedCheckpointError, IncompatibleCheckpointError
from gdn2_jax.config import CheckpointConfig, ConfigError, DataConfig

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
    over = ("checkpoint.resume=false", "checkpoint.overwrite=delete")
    fresh = trainer.train(tiny_config(tmp_path, wider, *over), until=0)
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


# -- a used workdir: resume=false never mixes with or destroys the run in it ------------------


def _losses(path):
    return [(r["step"], r["loss"]) for r in read_metrics(path)]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The workdir of a tiny run checkpointed at steps 2 and 4."""
    path = tmp_path_factory.mktemp("tiny_run")
    trainer.train(tiny_config(path, "checkpoint.every_steps=2"), until=4)
    return path


def _copy_run(tiny_run, tmp_path):
    shutil.copytree(tiny_run, tmp_path, dirs_exist_ok=True)
    return tmp_path


def test_resume_false_in_used_workdir_refuses_and_keeps_the_run(tiny_run, tmp_path):
    path = _copy_run(tiny_run, tmp_path)
    before = _losses(path)
    with pytest.raises(workdir.WorkdirInUseError) as err:
        trainer.train(tiny_config(path, "checkpoint.resume=false"), until=1)
    message = str(err.value)
    assert f"train.workdir {path} already holds a run" in message
    assert "checkpoint steps 2, 4" in message and "continue it (checkpoint.resume=true)" in message
    assert "checkpoint.overwrite=move" in message and "checkpoint.overwrite=delete" in message
    assert sorted(p.name for p in (path / "checkpoints").iterdir()) == ["2", "4"]
    assert _losses(path) == before


def test_train_py_refuses_used_workdir_with_one_error_line(tiny_run, tmp_path):
    path = _copy_run(tiny_run, tmp_path)
    sets = [f"--set={o}" for o in tiny_overrides(path, "checkpoint.resume=false")]
    child = run_python(["train.py", "--config", str(DEFAULT_CONFIG), *sets])
    lines = child.stderr.splitlines()
    assert child.returncode == 2 and len(lines) == 1, child.stderr
    assert lines[0].startswith(f"error: train.workdir {path} already holds a run")


def test_overwrite_move_keeps_old_run_aside_and_metrics_unmixed(tiny_run, tmp_path):
    path = _copy_run(tiny_run, tmp_path)
    old_losses = _losses(path)
    over = ("checkpoint.resume=false", "checkpoint.overwrite=move")
    trainer.train(tiny_config(path, *over), until=1)
    (moved,) = (path / workdir.PREVIOUS_RUNS).iterdir()
    assert sorted(p.name for p in (moved / "checkpoints").iterdir()) == ["2", "4"]
    assert _losses(moved) == old_losses
    # The new run starts from step 0, alone in metrics.jsonl and in checkpoints/.
    assert [s for s, _ in _losses(path)] == [1]
    assert _losses(path)[0] == old_losses[0]
    assert sorted(p.name for p in (path / "checkpoints").iterdir()) == ["1"]


def test_overwrite_delete_removes_old_run(tiny_run, tmp_path):
    path = _copy_run(tiny_run, tmp_path)
    assert workdir.run_entries(path) == ["checkpoints", "metrics.jsonl"]
    workdir.prepare(path, CheckpointConfig(resume=False, overwrite="delete"), steps=[2, 4])
    assert workdir.run_entries(path) == [] and not (path / workdir.PREVIOUS_RUNS).exists()


def test_overwrite_without_resume_false_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"overwrite='move' .*checkpoint\.resume=false"):
        workdir.prepare(tmp_path, CheckpointConfig(overwrite="move"), steps=[])


def test_metrics_without_checkpoint_are_not_appended_to(tmp_path):
    """A run that logged but never saved: resuming is impossible, appending would mix runs."""
    (tmp_path / "metrics.jsonl").write_text('{"split": "train", "step": 1, "loss": 3.0}\n')
    with pytest.raises(workdir.WorkdirInUseError, match="saved no checkpoint to resume"):
        workdir.prepare(tmp_path, CheckpointConfig(), steps=[])
    workdir.prepare(tmp_path, CheckpointConfig(resume=False, overwrite="delete"), steps=[])
    assert workdir.run_entries(tmp_path) == []


# -- integrity: a damaged latest step falls back to the newest intact one --------------------


def _largest_file(step_dir):
    return max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _delete(path):
    path.unlink()


def _truncate(path):
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _overwrite(path):
    """Same size, different bytes: only a checksum can tell."""
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.seek(size // 4)
        f.write(bytes(b ^ 0xFF for b in path.read_bytes()[size // 4 : size // 2]))


DAMAGES = {
    "delete": (_delete, "missing"),
    "truncate": (_truncate, "when saved"),
    "overwrite": (_overwrite, "contents changed since the save (SHA-256 differs)"),
}


@pytest.mark.parametrize("kind", DAMAGES)
def test_damaged_latest_step_is_set_aside_for_newest_intact(tiny_run, tmp_path, caplog, kind):
    damage, reason = DAMAGES[kind]
    path = _copy_run(tiny_run, tmp_path)
    damaged_file = _largest_file(path / "checkpoints" / "4")
    damage(damaged_file)
    ckpt = Checkpointer(path / "checkpoints", CheckpointConfig())
    with caplog.at_level("WARNING", logger="gdn2_jax.checkpoint"):
        assert ckpt.resume_step() == 2
    name = damaged_file.relative_to(path / "checkpoints" / "4").as_posix()
    assert f"damaged checkpoint: step 4 in {path / 'checkpoints'} ({name}: " in caplog.text
    assert reason in caplog.text
    assert "resuming from step 2, the newest intact step" in caplog.text
    # The damaged step is kept for inspection, out of the way of the run's next step 4.
    assert ckpt.all_steps() == [2] and ckpt.problems(2) == []
    (kept,) = (path / workdir.DAMAGED).iterdir()
    assert kept.name.startswith("4.") and manifest.problems(kept, 4)[0].startswith(name)
    ckpt.close()


def test_resume_past_damaged_latest_step_reproduces_losses(tiny_run, tmp_path):
    """Overwritten bytes (the damage orbax restores silently): the run resumes from step 2 and
    trains steps 3 and 4 again to the losses they had, each logged once."""
    path = _copy_run(tiny_run, tmp_path)
    uninterrupted = _losses(path)
    _overwrite(_largest_file(path / "checkpoints" / "4"))
    summary = trainer.train(tiny_config(path, "checkpoint.every_steps=2"), until=4)
    assert summary["step"] == 4 and _losses(path) == uninterrupted
    ckpt = Checkpointer(path / "checkpoints", CheckpointConfig())
    assert ckpt.all_steps() == [2, 4] and ckpt.latest_intact_step() == 4
    ckpt.close()


def test_resume_drops_metrics_logged_past_restored_step(tmp_path):
    rows = [json.dumps({"split": "train", "step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3)]
    # The last record was being written when the process was killed.
    (tmp_path / "metrics.jsonl").write_text("".join(rows) + '{"split": "tr')
    metrics.drop_records_after(tmp_path, 2)
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(rows[:2])
    (tmp_path / "metrics.jsonl").write_text(rows[0] + "not json\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2 is not a metrics record"):
        metrics.drop_records_after(tmp_path, 2)


def test_every_step_damaged_is_a_damage_error_not_a_fresh_start(tiny_run, tmp_path):
    path = _copy_run(tiny_run, tmp_path)
    for step in ("2", "4"):
        _truncate(_largest_file(path / "checkpoints" / step))
    with pytest.raises(DamagedCheckpointError, match=r"every checkpoint in .* is damaged") as err:
        trainer.train(tiny_config(path), until=5)
    assert "step 2: state/" in str(err.value) and "step 4: state/" in str(err.value)
    assert not isinstance(err.value, IncompatibleCheckpointError)
    assert sorted(p.name for p in (path / "checkpoints").iterdir()) == ["2", "4"]


def _saved_steps(directory, steps):
    ckpt = Checkpointer(directory, CheckpointConfig(keep=5, async_save=False))
    it = data.make_train_iterator(SMALL_DATA)
    for step in steps:
        _save(ckpt, step, step, it)
    ckpt.wait()
    return ckpt


def test_step_without_valid_manifest_is_not_trusted(tmp_path):
    """A save stopped between orbax's commit and the manifest, or a manifest overwritten."""
    ckpt = _saved_steps(tmp_path / "a", [1, 2])
    (tmp_path / "a" / "2" / manifest.NAME).unlink()
    assert ckpt.latest_intact_step() == 1
    assert "no gdn2_manifest.json" in ckpt.problems(2)[0]
    with pytest.raises(DamagedCheckpointError, match=r"damaged checkpoint .*/2: it has no"):
        ckpt.restore_state(2, {"w": jnp.zeros((4,))})
    ckpt.close()
    ckpt = _saved_steps(tmp_path / "b", [1, 2])
    (tmp_path / "b" / "2" / manifest.NAME).write_text('{"format": 1, "step": 2')
    assert ckpt.latest_intact_step() == 1 and "not valid JSON" in ckpt.problems(2)[0]
    np.testing.assert_array_equal(ckpt.restore_state(1, {"w": jnp.zeros((4,))})["w"], np.ones(4))
    ckpt.close()


def test_divergence_names_newest_intact_step(tmp_path):
    ckpt = _saved_steps(tmp_path, [1, 2])
    _overwrite(_largest_file(tmp_path / "2"))
    with pytest.raises(trainer.TrainingDivergedError, match=r"good checkpoint is step 1 in"):
        trainer.check_finite(3, {"loss": 2.0, "param_norm": math.inf}, ckpt)
    _overwrite(_largest_file(tmp_path / "1"))
    with pytest.raises(trainer.TrainingDivergedError, match=r"; no intact checkpoint is in"):
        trainer.check_finite(3, {"loss": math.nan}, ckpt)
    ckpt.close()


def test_data_position_resumes_across_num_workers(tiny_run, tmp_path, caplog):
    """Saved with data.num_workers=0 at step 2, resumed with a worker process (grain's
    per-worker iterator state used to refuse it): steps 3 and 4 see the batches, hence the
    losses, of the uninterrupted in-process run."""
    path = _copy_run(tiny_run, tmp_path)
    shutil.rmtree(path / "checkpoints" / "4")
    with caplog.at_level("WARNING", logger="gdn2_jax.checkpoint"):
        trainer.train(tiny_config(path, "checkpoint.every_steps=2", "data.num_workers=1"), until=4)
    assert "data.num_workers: 0 != 1" in caplog.text
    assert _losses(path) == _losses(tiny_run)


if __name__ == "__main__":
    if sys.argv[1] == "killed-save":
        _killed_save(sys.argv[2])
