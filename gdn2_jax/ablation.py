"""Gate ablation: GDN-2, its scalarized-gate variants, KDA and Gated DeltaNet trained on recall
tasks that load the fixed-size state, several seeds each, with means and 95% intervals.

All variants have the same state size (heads x K x V per layer). The tied-gate variants (KDA,
Gated DeltaNet) have one β projection instead of GDN-2's b and w projections; their MLP is widened
until their parameter count is the closest to GDN-2's. The seeds of a variant train together in
one program: the train step is `jax.vmap`ped over stacked parameters, optimizer states and
batches, so a variant compiles once. Every variant sees the same batches (seed s draws data
stream s) and is evaluated on the same held-out examples.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats
from flax import nnx
from tqdm.auto import tqdm

from gdn2_jax import sharding
from gdn2_jax.config import OptimizerConfig, RecallConfig
from gdn2_jax.data import pipeline
from gdn2_jax.data import recall as recall_lib
from gdn2_jax.model import CausalLM
from gdn2_jax.model_config import ModelConfig
from gdn2_jax.optim import make_optimizer
from gdn2_jax.train_step import TrainState, forward_stats, train_step
from gdn2_jax.typed_config import check_types

# name -> (gate_mode, allow_neg_eigval): the paper's Table 5 rows plus the tied-gate baselines.
VARIANTS: dict[str, tuple[str, bool]] = {
    "gdn2": ("gdn2", False),
    "gdn2_neg": ("gdn2", True),
    "b_only": ("b_only", False),
    "w_only": ("w_only", False),
    "kda": ("kda", False),
    "gdn": ("gdn", False),
}
# Held-out examples come from this data seed and the eval split, for every variant and seed.
EVAL_SEED = 10_000
CONFIDENCE = 0.95

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Task:
    """One recall task of the mixture; `recall` holds its difficulty knobs."""

    name: str
    recall: RecallConfig

    def __post_init__(self):
        check_types(self)


@dataclasses.dataclass(frozen=True)
class AblationConfig:
    """`model` is GDN-2's architecture; `batch_size` rows per task, seed and step."""

    model: ModelConfig
    tasks: tuple[Task, ...]
    seq_len: int
    batch_size: int
    steps: int
    eval_every: int
    eval_batches: int
    optimizer: OptimizerConfig
    seeds: int = 3
    variants: tuple[str, ...] = tuple(VARIANTS)
    # grain worker processes that build batches (0: in this process).
    num_workers: int = 0

    def __post_init__(self):
        check_types(self)
        for name in ("seq_len", "batch_size", "steps", "eval_every", "eval_batches", "seeds"):
            if getattr(self, name) < 1:
                raise ValueError(f"AblationConfig.{name} must be >= 1, got {getattr(self, name)}")
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            raise ValueError(
                f"AblationConfig.variants={self.variants!r}: choose from {tuple(VARIANTS)}"
            )
        if not self.tasks or len({t.name for t in self.tasks}) != len(self.tasks):
            raise ValueError("AblationConfig.tasks must be non-empty with distinct names")
        for task in self.tasks:
            recall_lib.validate(task.recall, self.seq_len)
            if task.recall.vocab_size > self.model.vocab_size:
                raise ValueError(
                    f"task {task.name!r} uses vocab_size={task.recall.vocab_size} > "
                    f"model.vocab_size={self.model.vocab_size}"
                )

    def replace(self, **changes: Any) -> AblationConfig:
        return dataclasses.replace(self, **changes)


def tasks_for(
    head_dim: int,
    seq_len: int,
    vocab_size: int,
    pairs_per_dim: float,
    easy_pairs_per_dim: float = 0,
):
    """The tasks: MQAR with `pairs_per_dim` x K pairs, version recall (half that many keys, each
    re-written twice on average) and a quarter as many keyed needles in a filler haystack, half
    of them asked (the rest are distractors); with `easy_pairs_per_dim`, also an MQAR that far
    below capacity, whose easy gradient teaches the recall mechanism the harder tasks need."""
    pairs = max(2, round(pairs_per_dim * head_dim))
    keys = max(2, pairs // 2)
    mqar = RecallConfig("mqar", vocab_size, pairs, min(pairs, (seq_len - 2 * pairs) // 2))
    writes = 3 * keys
    overwrite = RecallConfig(
        "overwrite", vocab_size, keys, min(keys, (seq_len - 2 * writes) // 2), writes - keys
    )
    needles = max(2, pairs // 4)
    needle = RecallConfig("needle", vocab_size, needles, max(1, needles // 2))
    tasks = (Task("mqar", mqar), Task("overwrite", overwrite), Task("mk_needle", needle))
    if easy_pairs_per_dim:
        easy = max(2, round(easy_pairs_per_dim * head_dim))
        tasks = (Task("mqar_easy", RecallConfig("mqar", vocab_size, easy, easy)), *tasks)
    return tasks


def _preset(name: str) -> AblationConfig:
    if name == "tiny":
        # CPU smoke size (tests, CI's notebook run): compiles in seconds, learns little.
        model = ModelConfig.preset(
            "tiny", vocab_size=64, hidden_size=32, intermediate_size=64, gdn2_num_heads=2,
            gdn2_head_dim=16, gdn2_backend="scan",
        )  # fmt: skip
        return AblationConfig(
            model=model, tasks=tasks_for(16, 48, 64, 0.5), seq_len=48, batch_size=4, steps=12,
            eval_every=6, eval_batches=1, seeds=2,
            optimizer=OptimizerConfig(lr=3e-3, warmup_steps=2),
        )  # fmt: skip
    if name == "h200-small":
        # ~0.5M parameters, 2 blocks of 2 heads with K = V = 32: MQAR stores 32 pairs per
        # 32-dim head key space, version recall re-writes 16 keys twice on average, 8 needles
        # hide in 256 tokens of filler, and an 8-pair MQAR teaches the recall mechanism.
        # Calibrated on the H200 (benchmarks/RESULTS.md): GDN-2 at 2000 steps was still
        # climbing; without the easy task every variant stayed at chance for 600 steps. At
        # 4000 steps and 5 seeds the variants did not separate: seeds differed in when they
        # left the recall plateau, not in what their states held.
        model = ModelConfig.preset(
            "tiny", vocab_size=256, hidden_size=128, intermediate_size=384,
            gdn2_num_heads=2, gdn2_head_dim=32, dtype="bfloat16",
        )  # fmt: skip
        return AblationConfig(
            model=model, tasks=tasks_for(32, 256, 256, 1.0, 0.25), seq_len=256, batch_size=32,
            steps=4000, eval_every=400, eval_batches=2, seeds=5, num_workers=8,
            optimizer=OptimizerConfig(lr=1e-3, warmup_steps=100, weight_decay=0.1),
        )  # fmt: skip
    if name == "h200":
        # ~10M parameters, 4 blocks of 4 heads with K = V = 64 (the size range): MQAR
        # stores 64 pairs per 64-dim head key space, version recall re-writes 32 keys twice on
        # average, 16 needles hide in 256 tokens of filler, a 16-pair MQAR teaches recall.
        # 16 rows per task, seed and step keep a step near 50K tokens for 3 seeds, so the six
        # variants train in minutes each; a 13.5M model with 32 rows of 512 tokens did not
        # finish 2000 steps in 165 s (benchmarks/RESULTS.md, calibration row). Measured on an
        # H100 (2026-12-07): 2000 steps took ~300 s with three runs sharing the GPU, and no
        # variant had left the recall plateau by then (mqar_easy <= 11%); it is not calibrated.
        model = ModelConfig.preset(
            "tiny", vocab_size=256, hidden_size=512, intermediate_size=1024,
            block_pattern=("gdn2",) * 4, gdn2_num_heads=4, gdn2_head_dim=64, dtype="bfloat16",
        )  # fmt: skip
        return AblationConfig(
            model=model, tasks=tasks_for(64, 256, 256, 1.0, 0.25), seq_len=256, batch_size=16,
            steps=3000, eval_every=300, eval_batches=4, seeds=3, num_workers=4,
            optimizer=OptimizerConfig(lr=1e-3, warmup_steps=100, weight_decay=0.1),
        )  # fmt: skip
    raise ValueError(f"unknown ablation preset {name!r}; choose from {PRESET_NAMES}")


PRESET_NAMES = ("tiny", "h200", "h200-small")


def preset(name: str, **changes: Any) -> AblationConfig:
    return _preset(name).replace(**changes)


def param_count(model: ModelConfig) -> int:
    abstract = nnx.eval_shape(lambda: CausalLM(model, rngs=nnx.Rngs(0)))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract)))


def variant_model(cfg: AblationConfig, variant: str) -> ModelConfig:
    """The variant's architecture: its gates, and the MLP width that brings its parameter count
    closest to GDN-2's (the count is affine in the width)."""
    gate_mode, neg = VARIANTS[variant]
    model = dataclasses.replace(cfg.model, gate_mode=gate_mode, allow_neg_eigval=neg)
    target = param_count(cfg.model)
    width = model.intermediate_size
    at_width, at_next = (
        param_count(model),
        param_count(dataclasses.replace(model, intermediate_size=width + 1)),
    )
    best = width + round((target - at_width) / (at_next - at_width))
    return dataclasses.replace(model, intermediate_size=max(1, best))


def _task_rows(cfg: AblationConfig, task: Task, seed: int, split: int, start: int):
    source = recall_lib.RecallSource(task.recall, cfg.seq_len, seed, split)
    rows = [source[i] for i in range(start, start + cfg.batch_size)]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _stack(parts: list[dict[str, np.ndarray]], axis: int = 0) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts], axis=axis) for k in parts[0]}


def _train_batch(cfg: AblationConfig, step: int) -> dict[str, np.ndarray]:
    """[seeds, tasks x batch_size, seq_len]: seed s's rows of every task at this step."""
    per_seed = [
        _stack([_task_rows(cfg, t, s, 0, step * cfg.batch_size) for t in cfg.tasks])
        for s in range(cfg.seeds)
    ]
    return {k: np.stack([p[k] for p in per_seed]) for k in per_seed[0]}


def train_batches(cfg: AblationConfig):
    """An iterator over the steps' batches, built by grain (in worker processes if asked)."""
    ds = grain.MapDataset.range(cfg.steps).map(functools.partial(_train_batch, cfg))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
    return iter(pipeline.in_workers(it, cfg.num_workers))


def eval_batches(cfg: AblationConfig) -> dict[str, list[dict[str, np.ndarray]]]:
    """task -> the held-out batches [batch_size, seq_len] every run is scored on."""
    return {
        t.name: [
            _task_rows(cfg, t, EVAL_SEED, 1, i * cfg.batch_size) for i in range(cfg.eval_batches)
        ]
        for t in cfg.tasks
    }


@dataclasses.dataclass(frozen=True)
class Steps:
    """The jitted programs of one variant, each over the stacked seeds."""

    init: Callable
    train: Callable
    eval: Callable


def build_steps(cfg: AblationConfig, model: ModelConfig) -> Steps:
    optimizer, schedule = make_optimizer(cfg.optimizer, cfg.steps)
    with nnx.logical_axis_rules(sharding.LOGICAL_RULES):
        graphdef = nnx.split(nnx.eval_shape(lambda: CausalLM(model, rngs=nnx.Rngs(0))))[0]

    def init(key):
        with nnx.logical_axis_rules(sharding.LOGICAL_RULES):
            params = nnx.to_pure_dict(nnx.state(CausalLM(model, rngs=nnx.Rngs(key))))
        return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))

    step = functools.partial(train_step, graphdef=graphdef, optimizer=optimizer, schedule=schedule)

    def evaluate(params, batch):
        stats = forward_stats(params, graphdef, batch)
        return {"correct": stats["correct"], "tokens": stats["tokens"]}

    return Steps(
        init=jax.jit(jax.vmap(init)),
        train=jax.jit(jax.vmap(step), donate_argnums=0),
        eval=jax.jit(jax.vmap(evaluate, in_axes=(0, None))),
    )


def _accuracy(steps: Steps, params, batches) -> dict[str, np.ndarray]:
    """task -> recall accuracy per seed [seeds]."""
    out = {}
    for name, task_batches in batches.items():
        totals = [steps.eval(params, b) for b in task_batches]
        correct = sum(np.asarray(t["correct"]) for t in totals)
        tokens = sum(np.asarray(t["tokens"]) for t in totals)
        out[name] = correct / np.maximum(tokens, 1.0)
    return out


def run_variant(cfg: AblationConfig, variant: str, *, progress: bool = True) -> dict[str, Any]:
    """Trains the variant's seeds together; returns its curves and final accuracies per seed."""
    model = variant_model(cfg, variant)
    steps = build_steps(cfg, model)
    held_out = eval_batches(cfg)
    t0 = time.perf_counter()
    # Seed s initializes from fold_in(key, s): its run does not depend on how many seeds ran.
    keys = jax.vmap(functools.partial(jax.random.fold_in, jax.random.key(0)))(jnp.arange(cfg.seeds))
    state = steps.init(keys)
    losses, eval_steps, curves = [], [], {t.name: [] for t in cfg.tasks}
    data = train_batches(cfg)
    for i in tqdm(range(cfg.steps), desc=variant, disable=not progress, leave=False):
        state, metrics = steps.train(state, next(data))
        losses.append(metrics["loss"])
        if i == 0:
            jax.block_until_ready(metrics)
            first_step_s = time.perf_counter() - t0
        if (i + 1) % cfg.eval_every == 0 or i + 1 == cfg.steps:
            eval_steps.append(i + 1)
            for name, acc in _accuracy(steps, state.params, held_out).items():
                curves[name].append(acc)
            log.info(
                "%s step %d loss %.4f recall %s", variant, i + 1, float(np.mean(losses[-1])),
                " ".join(f"{name} {np.mean(c[-1]):.3f}" for name, c in curves.items()),
            )  # fmt: skip
    wall = time.perf_counter() - t0
    final = {name: np.asarray(c[-1]).tolist() for name, c in curves.items()}
    return {
        "variant": variant,
        "gate_mode": model.gate_mode,
        "allow_neg_eigval": model.allow_neg_eigval,
        "intermediate_size": model.intermediate_size,
        "params": param_count(model),
        "state_floats_per_layer": _state_size(model),
        "train_loss": loss_curve(_seeds_major(losses)),
        "eval_steps": eval_steps,
        "eval_accuracy": {name: _seeds_major(c) for name, c in curves.items()},
        "final_accuracy": final,
        "final_mean_accuracy": np.mean([final[t.name] for t in cfg.tasks], axis=0).tolist(),
        "first_step_s": first_step_s,
        "wall_s": wall,
    }


def _seeds_major(rows: list) -> list:
    """Per-step arrays [seeds] -> nested lists [seeds][steps]."""
    return np.stack([np.asarray(r) for r in rows], axis=1).tolist()


def loss_curve(per_seed: list) -> list:
    """Train losses [seeds][steps] to 4 decimals: they are only plotted, and at thousands of steps
    full float repr would make the JSON megabytes."""
    return np.round(np.asarray(per_seed, np.float64), 4).tolist()


def _state_size(model: ModelConfig) -> int:
    heads = model.gdn2_num_v_heads or model.gdn2_num_heads
    return heads * model.gdn2_head_dim * int(model.gdn2_head_dim * model.gdn2_expand_v)


def config_dict(cfg: AblationConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def run(
    cfg: AblationConfig, out: str | Path | None = None, *, progress: bool = True
) -> dict[str, Any]:
    """Every variant in turn; the JSON at `out` is rewritten after each, so a run cut short
    keeps the variants it finished."""
    results = {
        "config": config_dict(cfg),
        "device": jax.devices()[0].device_kind,
        "date": time.strftime("%Y-%m-%d"),
        "runs": [],
    }
    for variant in cfg.variants:
        results["runs"].append(run_variant(cfg, variant, progress=progress))
        if out is not None:
            Path(out).write_text(json.dumps(results))
    return results


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from runs of the same configuration made in pieces (e.g. a few variants per
    device call): the runs concatenated in order, the config naming every variant run."""
    first = parts[0]["config"]
    for part in parts[1:]:
        other = part["config"]
        differing = sorted(
            k
            for k in first.keys() | other.keys()
            if k != "variants" and first.get(k) != other.get(k)
        )
        if differing or part["device"] != parts[0]["device"]:
            raise ValueError(
                f"cannot merge ablation results that differ in {differing or ['device']}"
            )
    runs = [
        {**run, "train_loss": loss_curve(run["train_loss"])}
        for part in parts
        for run in part["runs"]
    ]
    variants = [run["variant"] for run in runs]
    if len(set(variants)) != len(variants):
        raise ValueError(f"cannot merge ablation results that repeat variants: {variants}")
    config = {**first, "variants": variants}
    dates = sorted({part["date"] for part in parts})
    return {**parts[0], "config": config, "date": " / ".join(dates), "runs": runs}


def interval(values) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t interval (nan for a single value)."""
    x = np.asarray(values, np.float64)
    if x.size < 2:
        return float(x.mean()), math.nan
    half = scipy.stats.t.ppf(0.5 + CONFIDENCE / 2, x.size - 1) * scipy.stats.sem(x)
    return float(x.mean()), float(half)


def summary_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per variant: parameters, and (mean, half-width) of the final accuracy per task and on
    average over the tasks; sorted best mean first."""
    rows = []
    for r in results["runs"]:
        cells = {name: interval(acc) for name, acc in r["final_accuracy"].items()}
        cells["mean"] = interval(r["final_mean_accuracy"])
        rows.append({"variant": r["variant"], "params": r["params"], "cells": cells})
    return sorted(rows, key=lambda row: -row["cells"]["mean"][0])


def _cell(mean: float, half: float) -> str:
    return f"{100 * mean:.1f}" if math.isnan(half) else f"{100 * mean:.1f} ± {100 * half:.1f}"


def markdown_table(results: dict[str, Any]) -> str:
    """Final eval recall accuracy (%), mean ± 95% interval half-width over seeds."""
    rows = summary_rows(results)
    tasks = list(rows[0]["cells"])
    seeds = len(results["runs"][0]["final_mean_accuracy"])
    head = ["variant", "params", *tasks]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for row in rows:
        cells = [_cell(*row["cells"][t]) for t in tasks]
        lines.append(f"| {row['variant']} | {row['params']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\n{seeds} seeds per variant; ± is the 95% t-interval.\n"


def ordering(results: dict[str, Any]) -> str:
    """ "a > b ~ c": variants by mean accuracy over tasks; ~ where the 95% intervals overlap."""
    rows = summary_rows(results)
    text = rows[0]["variant"]
    for prev, row in itertools.pairwise(rows):
        (m0, h0), (m1, h1) = prev["cells"]["mean"], row["cells"]["mean"]
        apart = not (math.isnan(h0) or math.isnan(h1)) and m0 - h0 > m1 + h1
        text += (" > " if apart else " ~ ") + row["variant"]
    return text


def report(results: dict[str, Any]) -> str:
    """A RESULTS.md section: where and what ran, the table, the ordering, the timings."""
    cfg = results["config"]
    model = cfg["model"]
    tasks = ", ".join(
        f"{t['name']} ({t['recall']['num_pairs']} keys"
        + (f", {t['recall']['num_overwrites']} re-writes" if t["recall"]["num_overwrites"] else "")
        + f", {t['recall']['num_queries']} asked)"
        for t in cfg["tasks"]
    )
    runs = results["runs"]
    wall = sum(r["wall_s"] for r in runs)
    return (
        f"## Gate ablation, {results['date']}, {results['device']}\n\n"
        f"{len(model['block_pattern'])} blocks, hidden {model['hidden_size']}, "
        f"{model['gdn2_num_heads']} heads of K = V = {model['gdn2_head_dim']}, "
        f"{model['dtype']}; length {cfg['seq_len']}, {cfg['batch_size']} rows per task and "
        f"step, {cfg['steps']} steps, lr {cfg['optimizer']['lr']}. Tasks: {tasks}. Final eval "
        f"recall accuracy (%) on {cfg['eval_batches'] * cfg['batch_size']} held-out sequences "
        "per task:\n\n"
        + markdown_table(results)
        + f"\nOrdering by the mean over tasks (> where the 95% intervals are apart, ~ where "
        f"they overlap): {ordering(results)}.\n\n"
        f"Wall time {wall:.0f} s for {len(runs)} variants x {cfg['seeds']} seeds "
        f"(first step with compilation: "
        + ", ".join(f"{r['variant']} {r['first_step_s']:.0f} s" for r in runs)
        + ").\n"
    )
