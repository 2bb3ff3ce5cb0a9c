"""Checkpoints with orbax: train state, data-iterator position and config, saved together.

Orbax writes each step into a temporary directory and renames it only once every item is on
disk, so a save killed midway leaves no step directory and the previous checkpoint stays the
latest one. Leftover temporary directories are removed when the next run opens the manager.

A run resumes a checkpoint when what is stored still fits it: the same tree of arrays with the
same shapes and dtypes (parameters and optimizer state) and a data position that means the same
thing. Everything else in the config (how the model computes: backends, remat, compute dtype;
the learning-rate schedule; logging) may change on resume, and the changes are logged.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from gdn2_jax import config as config_lib
from gdn2_jax.config import CheckpointConfig

# Config keys that say what the saved data-iterator position points at.
DATA_POSITION_KEYS = ("data.kind", "data.seq_len", "data.batch_size", "data.paths")

log = logging.getLogger(__name__)


class IncompatibleCheckpointError(ValueError):
    """The checkpoint was written by a run whose config cannot be resumed by this one."""


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
    """A CheckpointManager over three items: "state", "data" (grain iterator) and "config"."""

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

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_iterator, config: dict) -> None:
        """Starts a save; with async saves it returns once the arrays are copied off-device."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(data_iterator),
                config=ocp.args.JsonSave(config),
            ),
            force=True,
        )

    def saved_config(self, step: int) -> dict:
        restored = self.manager.restore(
            step, args=ocp.args.Composite(config=ocp.args.JsonRestore())
        )
        return restored.config

    def saved_arrays(self, step: int):
        """The stored state's tree of array metadata (shape, dtype) without reading it."""
        return self.manager.item_metadata(step)["state"].tree

    def restore(self, step: int, abstract_state: Any, data_iterator, config: dict) -> Any:
        """Restores the state (onto the shardings of `abstract_state`) and moves the data
        iterator to where it was; refuses a checkpoint whose arrays or data position do not fit
        this run, and logs the config keys that changed."""
        saved_config = self.saved_config(step)
        problems = state_changes(self.saved_arrays(step), abstract_state)
        problems += data_position_changes(saved_config, config)
        if problems:
            raise IncompatibleCheckpointError(
                f"checkpoint {self.directory}/{step} does not fit this run "
                "(saved != current):\n  "
                + "\n  ".join(problems)
                + "\nUse another train.workdir, or set checkpoint.resume=false to start over."
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
                f"checkpoint {self.directory}/{step} does not hold the arrays its config "
                "describes (saved != expected):\n  " + "\n  ".join(problems)
            )
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        return self.manager.restore(step, args=args).state

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
