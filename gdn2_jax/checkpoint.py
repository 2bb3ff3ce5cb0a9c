"""Checkpoints with orbax: train state, data-iterator position and config, saved together.

Orbax writes each step into a temporary directory and renames it only once every item is on
disk, so a save killed midway leaves no step directory and the previous checkpoint stays the
latest one. Leftover temporary directories are removed when the next run opens the manager.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grain
import orbax.checkpoint as ocp

from gdn2_jax import config as config_lib
from gdn2_jax.config import CheckpointConfig

# Config keys whose change makes a checkpoint meaningless for the current run: the model's
# shapes, or what the saved data-iterator position points at.
COMPATIBILITY_KEYS = ("model", "data.kind", "data.seq_len", "data.batch_size", "data.paths")


class IncompatibleCheckpointError(ValueError):
    """The checkpoint was written by a run whose config cannot be resumed by this one."""


def _select(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d.get(part, {}) if isinstance(d, dict) else {}
    return d


def incompatibilities(saved: dict, current: dict) -> list[str]:
    out = []
    for key in COMPATIBILITY_KEYS:
        a, b = _select(saved, key), _select(current, key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_lib.diff(a, b, key + ".")
        elif a != b:
            out.append(f"{key}: {a!r} != {b!r}")
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
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "config")
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

    def restore(self, step: int, abstract_state: Any, data_iterator, config: dict) -> Any:
        """Restores the state (onto the shardings of `abstract_state`) and moves the data
        iterator to where it was; refuses checkpoints of an incompatible config."""
        problems = incompatibilities(self.saved_config(step), config)
        if problems:
            raise IncompatibleCheckpointError(
                f"checkpoint {self.directory}/{step} was written with a different config; "
                "these keys differ (saved != current):\n  "
                + "\n  ".join(problems)
                + "\nUse another train.workdir, or set checkpoint.resume=false to start over."
            )
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.checkpoint.CheckpointRestore(data_iterator),
        )
        try:
            restored = self.manager.restore(step, args=args)
        except (ValueError, KeyError) as e:
            raise IncompatibleCheckpointError(
                f"checkpoint {self.directory}/{step} does not match this run's train state "
                f"(parameter or optimizer-state structure differs): {e}"
            ) from e
        return restored.state

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
