"""Shared helpers for the training tests: a CPU-sized variant of the default config, metrics
reading, and running scripts in fresh processes (needed to give JAX several CPU devices)."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache

from gdn2_jax.config import Config, load_config

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "recall_tiny.py"

# XLA:CPU compiles even these tiny train steps slowly (~15 s on 2 cores), and most training tests
# compile the same programs: share them through JAX's persistent compilation cache, in a directory
# private to this test session. conftest.py makes it once per session and names it in the
# environment, so that pytest-xdist workers and every child process (which imports this module
# too) use the same one; a process started without it makes its own. The reset makes it take
# effect even if something was compiled before this module was imported.
CACHE_VARIABLE = "GDN2_JAX_TEST_XLA_CACHE"  # conftest.py's name for it
COMPILATION_CACHE = os.environ.get(CACHE_VARIABLE, "")
if not COMPILATION_CACHE:
    COMPILATION_CACHE = tempfile.mkdtemp(prefix="gdn2-jax-test-xla-cache-")
    atexit.register(shutil.rmtree, COMPILATION_CACHE, ignore_errors=True)
# Several processes may write and read the cache at once: a size limit (never reached) makes JAX
# take a file lock around every read and write, so none reads an entry another is writing.
CACHE_MAX_BYTES = 1 << 40
CACHE_ENV = {
    CACHE_VARIABLE: COMPILATION_CACHE,
    "JAX_COMPILATION_CACHE_DIR": COMPILATION_CACHE,
    "JAX_COMPILATION_CACHE_MAX_SIZE": str(CACHE_MAX_BYTES),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.1",
}
jax.config.update("jax_compilation_cache_dir", COMPILATION_CACHE)
jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
compilation_cache.reset_cache()

# The default config shrunk so that a step compiles in seconds and runs in milliseconds.
TINY = (
    # Pinned so that tuning the default config does not move the golden numbers.
    "model.gdn2_backend=xla",
    "optimizer.lr=3e-3",
    "model.vocab_size=32",
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "model.gdn2_num_heads=2",
    "model.gdn2_head_dim=16",
    "model.chunk_size=16",
    "data.seq_len=32",
    "data.batch_size=8",
    "data.recall.vocab_size=32",
    "data.recall.num_pairs=4",
    "data.recall.num_queries=4",
    "optimizer.warmup_steps=2",
    "logging.every_steps=1",
    "logging.progress_bar=false",
    "logging.tensorboard=false",
    "eval.every_steps=0",
    "eval.num_batches=1",
    "checkpoint.every_steps=0",
    # One step count for every test, so that their train steps (whose learning-rate schedule
    # depends on it) are one program; shorter runs stop early with `trainer.train(until=...)`.
    "train.steps=8",
)


# With b1 = 0 and no clipping, Adam's first moment after a step is exactly that step's gradient,
# so the train step itself reports every gradient leaf (no separate gradient program to compile).
GRADIENTS_IN_ADAM = ("optimizer.b1=0.0", "optimizer.clip_norm=0")


def adam_first_moment(opt_state):
    """The first moment (mu) of the Adam state inside an optax optimizer state."""
    import optax

    states = jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
    return next(s for s in states if isinstance(s, optax.ScaleByAdamState)).mu


def tree_error(got, want) -> float:
    """The largest per-leaf relative error (‖a − b‖ / ‖b‖) between two pytrees."""
    from gdn2_jax.crosscheck import rel_err

    pairs = zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
    return max(rel_err(a, b) for a, b in pairs)


def tiny_overrides(workdir: str | Path, *extra: str) -> list[str]:
    return [*TINY, f"train.workdir={workdir}", *extra]


def tiny_config(workdir: str | Path, *extra: str) -> Config:
    return load_config(DEFAULT_CONFIG, tiny_overrides(workdir, *extra))


def read_metrics(workdir: str | Path, split: str = "train") -> list[dict]:
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def python_env(num_cpu_devices: int = 1) -> dict[str, str]:
    """The environment for a child Python with `num_cpu_devices` virtual CPU devices."""
    env = dict(os.environ)
    # The session's other flags (conftest.py) stay.
    device_count = "--xla_force_host_platform_device_count"
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(device_count)]
    env["XLA_FLAGS"] = " ".join([*flags, f"{device_count}={num_cpu_devices}"])
    env |= CACHE_ENV
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def run_python(args: list[str], *, num_cpu_devices: int = 1, timeout: float = 600):
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=python_env(num_cpu_devices),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
