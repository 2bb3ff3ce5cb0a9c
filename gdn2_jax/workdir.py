"""What a run keeps in its workdir, and starting over in a used one.

A new run never appends to, collides with or deletes an earlier one: in a workdir that holds a
run it either resumes that run's checkpoints or, when told to start over, refuses unless
`checkpoint.overwrite` says to move the old run aside or to delete it.
"""

from __future__ import annotations

import datetime
import logging
import shutil
from pathlib import Path

import jax
from jax.experimental import multihost_utils

from gdn2_jax.config import CheckpointConfig, ConfigError

CHECKPOINTS = "checkpoints"
# Latest steps that failed their integrity check, moved out of CHECKPOINTS on resume.
DAMAGED = "damaged_checkpoints"
RUN_ENTRIES = (CHECKPOINTS, DAMAGED, "metrics.jsonl", "tensorboard")
PREVIOUS_RUNS = "previous_runs"

log = logging.getLogger(__name__)


class WorkdirInUseError(RuntimeError):
    """Starting a new run would mix with, or destroy, the run already in the workdir."""


def run_entries(workdir: Path) -> list[str]:
    """The entries of RUN_ENTRIES that `workdir` holds (empty directories do not count)."""
    found = []
    for name in RUN_ENTRIES:
        path = workdir / name
        if path.is_file() or (path.is_dir() and any(path.iterdir())):
            found.append(name)
    return found


def utc_stamp() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S.%fZ")


def sync(name: str) -> None:
    """Every process waits here until process 0, which alone moves files, is done."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"gdn2_jax:{name}")


def _refusal(workdir: Path, found: list[str], steps: list[int], cfg: CheckpointConfig) -> str:
    held = ", ".join(found)
    if steps:
        held += f"; checkpoint steps {', '.join(map(str, steps))}"
    if cfg.resume:
        why = "it saved no checkpoint to resume, and a new run would mix with its files"
        options = "use another train.workdir"
    else:
        why = "checkpoint.resume=false would start a new run on top of it"
        options = "continue it (checkpoint.resume=true), " if steps else ""
        options += "use another train.workdir"
    return (
        f"train.workdir {workdir} already holds a run ({held}): {why}. Either {options}, or "
        f"replace it with checkpoint.resume=false and checkpoint.overwrite=move (moves it into "
        f"{workdir / PREVIOUS_RUNS}/<UTC time>/) or checkpoint.overwrite=delete (removes it)."
    )


def prepare(workdir: Path, cfg: CheckpointConfig, steps: list[int]) -> None:
    """Makes `workdir` ready for the run before anything is written to it.

    `steps` are the checkpoint steps on disk. Resuming them needs nothing; starting over where
    a run is kept refuses, or moves / deletes that run as `cfg.overwrite` asks."""
    if cfg.overwrite != "no" and cfg.resume:
        raise ConfigError(
            f"checkpoint.overwrite={cfg.overwrite!r} replaces the run in train.workdir only "
            "when starting over: set checkpoint.resume=false with it"
        )
    found = run_entries(workdir)
    if not found or (cfg.resume and steps):
        return
    if cfg.overwrite == "no":
        raise WorkdirInUseError(_refusal(workdir, found, steps, cfg))
    if jax.process_index() == 0:
        if cfg.overwrite == "move":
            target = workdir / PREVIOUS_RUNS / utc_stamp()
            target.mkdir(parents=True)
            for name in found:
                (workdir / name).rename(target / name)
            log.warning("checkpoint.overwrite=move: moved %s of %s to %s", found, workdir, target)
        else:
            for name in found:
                path = workdir / name
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            log.warning("checkpoint.overwrite=delete: removed %s from %s", found, workdir)
    sync("workdir-prepared")
