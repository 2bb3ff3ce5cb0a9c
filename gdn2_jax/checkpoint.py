"""Checkpoints with orbax: train state, data-iterator position and config, saved together.

Orbax writes each step into a temporary directory and renames it only once every item is on
disk, so a save killed midway leaves no step directory and the previous checkpoint stays the
latest one. Leftover temporary directories are removed when the next run opens the manager.
Once orbax has finalized a step, its integrity manifest (`gdn2_jax.manifest`) is written into
it; only steps whose files all match their manifest are restored. A damaged latest step is
moved aside and the run resumes from the newest intact one, with a warning naming both.

A run resumes a checkpoint when what is stored still fits it: the same tree of arrays with the
same shapes and dtypes (parameters and optimizer state) and a data position that means the same
thing. Everything else in the config (how the model computes: backends, remat, compute dtype;
the learning-rate schedule; logging) may change on resume, and the changes are logged.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from gdn2_jax import config as config_lib
from gdn2_jax import manifest, workdir
from gdn2_jax.config import CheckpointConfig

# Config keys that say what the saved data-iterator position points at.
DATA_POSITION_KEYS = ("data.kind", "data.seq_len", "data.batch_size", "data.paths")

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be restored."""


class IncompatibleCheckpointError(CheckpointError):
    """The checkpoint is intact, but was written by a run whose config cannot be resumed by
    this one."""


class DamagedCheckpointError(CheckpointError):
    """The checkpoint's files do not match the manifest written when it was saved."""


def _select(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d.get(part, {}) if isinstance(d, dict) else {}
    return d


def data_position_changes(saved: dict, current: dict) -> list[str]:
    """The data-position keys whose values differ, as "key: saved != current"."""
    out = []
    for key in DATA_POSITION_KEYS:
        a, b = _select(saved, key), _select(current, key)
        if a != b:
            out.append(f"{key}: {a!r} != {b!r}")
    return out


def _key_name(key) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _array_table(tree) -> dict[str, tuple]:
    """{"params.blocks.0.mixer...": (shape, dtype)} of every array leaf."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        ".".join(_key_name(k) for k in path): (tuple(x.shape), str(x.dtype)) for path, x in leaves
    }


def state_changes(saved_tree, target) -> list[str]:
    """How the stored arrays differ from the ones the run expects (missing, extra, reshaped)."""
    saved, wanted = _array_table(saved_tree), _array_table(target)
    out = [f"{n}: only in the checkpoint" for n in sorted(saved.keys() - wanted.keys())]
    out += [f"{n}: not in the checkpoint" for n in sorted(wanted.keys() - saved.keys())]
    for name in sorted(saved.keys() & wanted.keys()):
        (s_shape, s_dtype), (w_shape, w_dtype) = saved[name], wanted[name]
        if (s_shape, s_dtype) != (w_shape, w_dtype):
            out.append(f"{name}: {s_dtype}{list(s_shape)} != {w_dtype}{list(w_shape)}")
    return out


class Checkpointer:
    """A CheckpointManager over three items: "state", "data" (grain iterator) and "config",
    with an integrity manifest per step."""

    def __init__(self, directory: str | Path, cfg: CheckpointConfig):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep,
            enable_async_checkpointing=cfg.async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        # Handlers named up front, so that a fresh process can read a step's metadata before
        # its first save or restore.
        handlers = {
            "state": ocp.StandardCheckpointHandler(),
            "data": grain.checkpoint.CheckpointHandler(),
            "config": ocp.JsonCheckpointHandler(),
        }
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=handlers
        )
        # Steps orbax may still be writing: their manifests follow once it is done.
        self._unsealed: list[int] = []
        # The step whose files were just checked, so that the reads of one restore check them
        # once; forgotten at the next save or wait, after which files are checked afresh.
        self._verified: int | None = None

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_iterator, config: dict) -> None:
        """Starts a save; with async saves it returns once the arrays are copied off-device."""
        # Orbax would wait for the previous save here anyway: waiting first lets its manifest
        # be written before the next save starts.
        self.wait()
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(data_iterator),
                config=ocp.args.JsonSave(config),
            ),
            force=True,
        )
        self._unsealed.append(step)

    def step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    def problems(self, step: int) -> list[str]:
        """Why the step cannot be trusted (empty when its files match its manifest)."""
        return manifest.problems(self.step_dir(step), step)

    def latest_intact_step(self) -> int | None:
        return next((s for s in reversed(self.all_steps()) if not self.problems(s)), None)

    def _require_intact(self, step: int) -> None:
        if step == self._verified:
            return
        problems = self.problems(step)
        if problems:
            raise DamagedCheckpointError(
                f"damaged checkpoint {self.step_dir(step)}: " + "; ".join(problems)
            )
        self._verified = step

    def resume_step(self) -> int | None:
        """The newest intact step, after moving the damaged steps above it out of the way (to
        the workdir's damaged_checkpoints/) with a warning; None when there are no steps.
        Raises DamagedCheckpointError when no step is intact."""
        steps = self.all_steps()
        checked = {}
        for step in reversed(steps):
            checked[step] = self.problems(step)
            if not checked[step]:
                break
        intact = next((s for s, p in checked.items() if not p), None)
        if steps and intact is None:
            raise DamagedCheckpointError(
                f"every checkpoint in {self.directory} is damaged, none can be resumed:\n  "
                + "\n  ".join(f"step {s}: {'; '.join(checked[s])}" for s in steps)
                + "\nSet checkpoint.resume=false with checkpoint.overwrite=move to start over "
                "keeping them, or use another train.workdir."
            )
        for step in [s for s in steps if intact is not None and s > intact]:
            target = self.directory.parent / workdir.DAMAGED / f"{step}.{workdir.utc_stamp()}"
            log.warning(
                "damaged checkpoint: step %d in %s (%s); resuming from step %d, the newest "
                "intact step; step %d moved to %s",
                step, self.directory, "; ".join(checked[step]), intact, step, target,
            )  # fmt: skip
            if jax.process_index() == 0:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(self.step_dir(step), target)
        workdir.sync("damaged-steps-moved")
        self.manager.reload()
        self._verified = intact
        return intact

    def saved_config(self, step: int) -> dict:
        self._require_intact(step)
        restored = self.manager.restore(
            step, args=ocp.args.Composite(config=ocp.args.JsonRestore())
        )
        return restored.config

    def saved_arrays(self, step: int):
        """The stored state's tree of array metadata (shape, dtype) without reading it."""
        self._require_intact(step)
        return self.manager.item_metadata(step)["state"].tree

    def restore(self, step: int, abstract_state: Any, data_iterator, config: dict) -> Any:
        """Restores the state (onto the shardings of `abstract_state`) and moves the data
        iterator to where it was; refuses a damaged checkpoint and one whose arrays or data
        position do not fit this run, and logs the config keys that changed."""
        saved_config = self.saved_config(step)
        problems = state_changes(self.saved_arrays(step), abstract_state)
        problems += data_position_changes(saved_config, config)
        if problems:
            raise IncompatibleCheckpointError(
                f"checkpoint {self.step_dir(step)} is intact but does not fit this run "
                "(saved != current):\n  "
                + "\n  ".join(problems)
                + "\nUse another train.workdir, or set checkpoint.resume=false with "
                "checkpoint.overwrite=move to start over."
            )
        changed = config_lib.diff(saved_config, config)
        if changed:
            log.warning(
                "resuming %s/%d with a changed config (saved != current):\n  %s",
                self.directory, step, "\n  ".join(changed),
            )  # fmt: skip
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.checkpoint.CheckpointRestore(data_iterator),
        )
        return self.manager.restore(step, args=args).state

    def restore_state(self, step: int, abstract_state: Any) -> Any:
        """The stored train state alone (no data position: evaluation needs no data files)."""
        problems = state_changes(self.saved_arrays(step), abstract_state)
        if problems:
            raise IncompatibleCheckpointError(
                f"checkpoint {self.step_dir(step)} does not hold the arrays its config "
                "describes (saved != expected):\n  " + "\n  ".join(problems)
            )
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        return self.manager.restore(step, args=args).state

    def wait(self) -> None:
        """Waits for orbax to finalize the steps being saved, then writes their manifests."""
        self.manager.wait_until_finished()
        if jax.process_index() == 0:
            for step in self._unsealed:
                manifest.write(self.step_dir(step), step)
        if self._unsealed:
            workdir.sync("manifests-written")
        self._unsealed = []
        self._verified = None

    def close(self) -> None:
        self.wait()
        # orbax 0.12.4 starts clearing unfinished temporary steps in a thread at construction
        # and joins it only in save(): a run that stops before its first save would leave that
        # thread to the interpreter's shutdown, which prints its traceback.
        self.manager._maybe_await_cleanup_tmp_directory()
        self.manager.close()
