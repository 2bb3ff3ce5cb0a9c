"""The training loop: build the sharded state, restore or initialise it, step, log, evaluate and
checkpoint. Device metrics are read one step late so the host never waits on the step it just
queued."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from gdn2_jax import data as data_lib
from gdn2_jax import metrics as metrics_lib
from gdn2_jax import sharding
from gdn2_jax import workdir as workdir_lib
from gdn2_jax.checkpoint import Checkpointer
from gdn2_jax.config import CheckpointConfig, Config, ConfigError, to_dict
from gdn2_jax.model import CausalLM
from gdn2_jax.optim import make_optimizer
from gdn2_jax.train_step import TrainState, eval_step, train_step


class TrainingDivergedError(RuntimeError):
    """The loss or gradient norm became NaN or Inf."""


@dataclasses.dataclass
class Run:
    """Everything built once per run: the mesh, the jitted steps and their shardings."""

    cfg: Config
    mesh: jax.sharding.Mesh
    graphdef: nnx.GraphDef
    abstract_state: TrainState
    state_shardings: TrainState
    init_fn: Any
    step_fn: Any
    eval_fn: Any
    flops_per_token: float


def maybe_initialize_distributed(cfg: Config) -> None:
    t = cfg.train
    if not t.distributed:
        return
    if t.coordinator_address:
        jax.distributed.initialize(t.coordinator_address, t.num_processes, t.process_id)
    else:
        # Cluster environments (SLURM, Kubernetes, Cloud TPU) are detected automatically.
        jax.distributed.initialize()


def abstract_model(cfg: Config) -> tuple[nnx.GraphDef, Any]:
    """The model's graph and its parameter shapes, without allocating anything."""
    with nnx.logical_axis_rules(sharding.LOGICAL_RULES):
        model = nnx.eval_shape(lambda: CausalLM(cfg.model, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    return graphdef, state


def build(cfg: Config, mesh: jax.sharding.Mesh) -> Run:
    graphdef, abstract_params = abstract_model(cfg)
    param_sh = sharding.param_shardings(abstract_params, mesh)
    optimizer, schedule = make_optimizer(cfg.optimizer, cfg.train.steps)
    repl = sharding.replicated(mesh)

    def init_fn(key):
        with nnx.logical_axis_rules(sharding.LOGICAL_RULES):
            model = CausalLM(cfg.model, rngs=nnx.Rngs(key))
        params = nnx.to_pure_dict(nnx.state(model))
        return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))

    abstract_state = jax.eval_shape(init_fn, jax.random.key(0))
    opt_sh = optax.tree_map_params(
        optimizer,
        lambda _, sh: sh,
        abstract_state.opt_state,
        param_sh,
        transform_non_params=lambda _: repl,
        is_leaf=lambda x: isinstance(x, jax.sharding.Sharding),
    )
    state_sh = TrainState(repl, param_sh, opt_sh)
    batch_sh = sharding.batch_sharding(mesh)
    step = functools.partial(
        train_step,
        graphdef=graphdef,
        optimizer=optimizer,
        schedule=schedule,
        accum_steps=cfg.optimizer.grad_accum_steps,
    )
    return Run(
        cfg=cfg,
        mesh=mesh,
        graphdef=graphdef,
        abstract_state=abstract_state,
        state_shardings=state_sh,
        init_fn=jax.jit(init_fn, out_shardings=state_sh),
        step_fn=jax.jit(
            step,
            in_shardings=(state_sh, batch_sh),
            out_shardings=(state_sh, repl),
            donate_argnums=0,
        ),
        eval_fn=jax.jit(
            functools.partial(eval_step, graphdef=graphdef),
            in_shardings=(param_sh, batch_sh),
            out_shardings=repl,
        ),
        flops_per_token=metrics_lib.train_flops_per_token(
            cfg.model, cfg.data.seq_len, abstract_state.params
        ),
    )


def open_checkpoints(workdir: Path, cfg: CheckpointConfig) -> Checkpointer:
    """The workdir's checkpoints, once `workdir.prepare` has made room for a new run (or
    refused to)."""
    ckpt = Checkpointer(workdir / workdir_lib.CHECKPOINTS, cfg)
    steps = ckpt.all_steps()
    ckpt.close()
    workdir_lib.prepare(workdir, cfg, steps)
    return Checkpointer(workdir / workdir_lib.CHECKPOINTS, cfg)


def restore_or_init(run: Run, ckpt: Checkpointer, data_iter) -> TrainState:
    step = ckpt.resume_step() if run.cfg.checkpoint.resume else None
    if step is None:
        return run.init_fn(jax.random.key(run.cfg.train.seed))
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        run.abstract_state,
        run.state_shardings,
    )
    return ckpt.restore(step, target, data_iter, to_dict(run.cfg))


def evaluate(run: Run, params, batches: list[dict[str, jax.Array]]) -> dict[str, float]:
    totals = None
    for batch in batches:
        stats = run.eval_fn(params, batch)
        totals = stats if totals is None else jax.tree.map(jnp.add, totals, stats)
    totals = jax.device_get(totals)
    tokens = max(float(totals["tokens"]), 1.0)
    loss = float(totals["loss_sum"]) / tokens
    name = "recall_accuracy" if run.cfg.data.kind == "recall" else "accuracy"
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 80.0)),
        name: float(totals["correct"]) / tokens,
    }


def check_finite(step: int, metrics: dict[str, float], ckpt: Checkpointer) -> None:
    """Stops on a NaN or Inf loss, gradient norm or parameter norm. Every saved state passed
    this check, so the newest intact checkpoint holds finite parameters."""
    watched = ("loss", "grad_norm", "param_norm")
    bad = {k: v for k, v in metrics.items() if k in watched and not math.isfinite(v)}
    if bad:
        ckpt.wait()
        last = ckpt.latest_intact_step()
        where = (
            f"the last good checkpoint is step {last} in {ckpt.directory}"
            if last is not None
            else f"no intact checkpoint is in {ckpt.directory}"
        )
        raise TrainingDivergedError(
            f"training diverged at step {step}: {bad}. Stopped without saving; {where}."
        )


def _due(done: int, every: int, total: int) -> bool:
    """Periodic work falls on multiples of `every` (never when it is <= 0) and the last step."""
    return done == total or (every > 0 and done % every == 0)


class Tracker:
    """Reads a step's metrics off the device, stops on NaN/Inf, logs and moves the bar."""

    def __init__(self, run: Run, ckpt: Checkpointer, writer: metrics_lib.MetricsWriter, bar):
        cfg = run.cfg
        self.cfg, self.ckpt, self.writer, self.bar = cfg, ckpt, writer, bar
        self.throughput = metrics_lib.Throughput(
            cfg.data.batch_size * cfg.data.seq_len,
            run.flops_per_token,
            metrics_lib.total_peak_flops(cfg.logging.peak_flops_per_device),
        )
        self.last: dict[str, float] = {}
        self._first = True
        # Without a progress bar, a line per log step is what shows a run's progress in its log.
        self._log_lines = not cfg.logging.progress_bar and jax.process_index() == 0

    def record(self, step: int, device_metrics: dict[str, jax.Array]) -> None:
        values = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        check_finite(step, values, self.ckpt)
        self.bar.update(1)
        if self._first:
            # The first step includes compilation; throughput counts from after it.
            self._first = False
            self.throughput.reset(step)
        if _due(step, self.cfg.logging.every_steps, self.cfg.train.steps):
            values |= self.throughput.measure(step)
            self.writer.write("train", step, values)
            self.bar.set_postfix(metrics_lib.format_postfix(values), refresh=False)
            if self._log_lines:
                self.bar.write(f"step {step}: train " + _fmt(values))
        self.last = values


def loop(
    run: Run, state: TrainState, data_iter, eval_data, tracker: Tracker, stop: int
) -> dict[str, Any]:
    cfg, ckpt = run.cfg, tracker.ckpt
    total = cfg.train.steps
    start = int(jax.device_get(state.step))
    pending = None
    eval_metrics: dict[str, float] = {}
    for step in range(start, stop):
        batch = sharding.host_local_to_global(next(data_iter), run.mesh)
        state, metrics = run.step_fn(state, batch)
        if pending is not None:
            tracker.record(*pending)
        done, pending = step + 1, (step + 1, metrics)
        do_eval = _due(done, cfg.eval.every_steps, total)
        do_save = _due(done, cfg.checkpoint.every_steps, total) or done == stop
        if do_eval or do_save:
            # Never save or report a state whose step went NaN.
            tracker.record(*pending)
            pending = None
        if do_eval:
            eval_metrics = evaluate(run, state.params, eval_data)
            tracker.writer.write("eval", done, eval_metrics)
            tracker.bar.write(f"step {done}: eval " + _fmt(eval_metrics))
        if do_save:
            ckpt.save(done, state, data_iter, to_dict(cfg))
        if do_eval or do_save:
            tracker.throughput.reset(done)
    if not eval_metrics:
        eval_metrics = evaluate(run, state.params, eval_data)
    return {"step": max(start, stop), "train": tracker.last, "eval": eval_metrics}


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items())


def check_batch(cfg: Config, mesh: jax.sharding.Mesh) -> None:
    """Each micro-batch is split evenly over the devices of the batch axes (data x fsdp), and
    each sequence evenly over those of the context axis."""
    accum, rows = cfg.optimizer.grad_accum_steps, cfg.data.batch_size
    shards = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
    if accum < 1 or rows % accum or (rows // accum) % shards:
        raise ConfigError(
            f"data.batch_size={rows} must split into optimizer.grad_accum_steps={accum} "
            f"micro-batches whose rows divide over the {shards} devices of the mesh's data and "
            "fsdp axes"
        )
    context = sharding.context_size(mesh)
    if cfg.data.seq_len % context:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} must divide by mesh.context={context}, the "
            "devices each sequence is split over"
        )


def _restore_and_loop(run: Run, ckpt: Checkpointer, data_iter, until: int | None) -> dict:
    cfg, mesh = run.cfg, run.mesh
    proc = {"process_index": jax.process_index(), "process_count": jax.process_count()}
    is_main = jax.process_index() == 0
    state = restore_or_init(run, ckpt, data_iter)
    start = int(jax.device_get(state.step))
    if is_main:
        # What was logged past the restored step is logged again as it is recomputed.
        metrics_lib.drop_records_after(cfg.train.workdir, start)
    writer = metrics_lib.MetricsWriter(
        cfg.train.workdir, tensorboard=cfg.logging.tensorboard, enabled=is_main
    )
    bar = metrics_lib.progress_bar(start, cfg.train.steps, cfg.logging.progress_bar and is_main)
    try:
        eval_data = [
            sharding.host_local_to_global(b, mesh)
            for b in data_lib.eval_batches(cfg.data, cfg.eval.num_batches, **proc)
        ]
        tracker = Tracker(run, ckpt, writer, bar)
        stop = cfg.train.steps if until is None else min(until, cfg.train.steps)
        return loop(run, state, data_iter, eval_data, tracker, stop)
    finally:
        bar.close()
        writer.close()


def train(cfg: Config, *, until: int | None = None) -> dict[str, Any]:
    """Trains `cfg` to `train.steps`, resuming from the workdir's newest intact checkpoint if
    any (see `open_checkpoints` for a workdir that holds another run).

    `until` ends this run early at that step, with a checkpoint, as a preempted or time-sliced
    job would; running again resumes the same schedule. Returns the final step, the last train
    metrics and the final eval metrics."""
    maybe_initialize_distributed(cfg)
    t0 = time.perf_counter()
    workdir = Path(cfg.train.workdir)
    mesh = sharding.make_mesh(cfg.mesh)
    check_batch(cfg, mesh)
    sharding.check_context_within_hosts(mesh)
    proc = {"process_index": jax.process_index(), "process_count": jax.process_count()}
    data_lib.check_vocab(data_lib.make_sources(cfg.data), cfg.model.vocab_size)
    with jax.set_mesh(mesh), contextlib.ExitStack() as stack:
        run = build(cfg, mesh)
        data_iter = data_lib.make_train_iterator(cfg.data, **proc)
        # Worker processes and orbax's threads end with the run, whatever stops it.
        stack.callback(data_iter.close)
        ckpt = open_checkpoints(workdir, cfg.checkpoint)
        stack.callback(ckpt.close)
        summary = _restore_and_loop(run, ckpt, data_iter, until)
    summary["wall_time_s"] = time.perf_counter() - t0
    return summary
