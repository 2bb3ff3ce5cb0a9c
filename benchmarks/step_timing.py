"""The train step as `train.py` builds it, on random tokens, compiled once and timed: shared by
bench_train.py (one device), bench_scaling.py (meshes of 1-8 devices, one or several processes)
and bench_context_overhead.py."""

import dataclasses
import statistics
import time

import jax
import numpy as np

from gdn2_jax import sharding, trainer
from gdn2_jax.config import Config


def random_batch(cfg: Config) -> dict[str, np.ndarray]:
    """The whole global batch of random tokens (the same on every process: seeded)."""
    rng = np.random.default_rng(0)
    shape = (cfg.data.batch_size, cfg.data.seq_len)
    tokens = rng.integers(0, cfg.model.vocab_size, size=(shape[0], shape[1] + 1))
    return {
        "inputs": tokens[:, :-1].astype(np.int32),
        "targets": tokens[:, 1:].astype(np.int32),
        "loss_mask": np.ones(shape, np.float32),
    }


def global_batch(cfg: Config, mesh) -> dict[str, jax.Array]:
    """`random_batch` as global arrays sharded like training batches. Every process builds the
    whole batch and hands over the shards of its own devices, so a process may hold only part
    of a sequence (a context axis across processes), which `host_local_to_global` does not allow
    for real data."""
    spec = sharding.batch_sharding(mesh)
    return {
        name: jax.make_array_from_callback(x.shape, spec, lambda index, x=x: x[index])
        for name, x in random_batch(cfg).items()
    }


def peak_bytes(compiled) -> int:
    """Per-device memory of a compiled step: arguments, outputs and temporaries, donated
    (aliased) buffers counted once."""
    mem = compiled.memory_analysis()
    return (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        + mem.temp_size_in_bytes
        - mem.alias_size_in_bytes
    )


@dataclasses.dataclass
class CompiledStep:
    """A compiled train step with the state it carries and the batch it reruns."""

    run: trainer.Run
    compiled: object
    state: object
    batch: dict
    setup_s: float

    def __call__(self):
        """One step, the state carried along; returns the step's metrics (not waited for)."""
        self.state, metrics = self.compiled(self.state, self.batch)
        return metrics


def compile_step(cfg: Config, mesh) -> CompiledStep:
    """Builds, initialises and compiles the train step of `cfg` on `mesh`."""
    trainer.check_batch(cfg, mesh)
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        run = trainer.build(cfg, mesh)
        state = run.init_fn(jax.random.key(0))
        batch = global_batch(cfg, mesh)
        compiled = run.step_fn.lower(state, batch).compile()
    return CompiledStep(run, compiled, state, batch, time.perf_counter() - start)


def time_steps(step: CompiledStep, warmup: int, steps: int) -> list[float]:
    """Seconds of each of `steps` steps after `warmup` steps, each step waited for: its time
    includes the host's dispatch, which a training loop overlaps with the step before."""
    for _ in range(warmup):
        jax.block_until_ready(step())
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(step())
        times.append(time.perf_counter() - start)
    return times


def time_train_step(cfg: Config, mesh, warmup: int, steps: int) -> dict:
    """Compiles the train step once, then times it: median step seconds, per-device peak bytes,
    setup seconds (build, init, compile and warm-up) and the analytic FLOPs per token."""
    step = compile_step(cfg, mesh)
    start = time.perf_counter()
    times = time_steps(step, warmup, steps)
    return {
        "step_s": statistics.median(times),
        "peak_bytes": peak_bytes(step.compiled),
        "setup_s": step.setup_s + time.perf_counter() - start - sum(times),
        "flops_per_token": step.run.flops_per_token,
    }
