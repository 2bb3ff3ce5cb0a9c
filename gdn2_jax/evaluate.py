"""Score a checkpoint that train.py wrote: held-out perplexity or needle-in-a-haystack retrieval.

    python -m gdn2_jax.evaluate --checkpoint runs/text_tiny --suite ppl --data runs/text_tokens
    python -m gdn2_jax.evaluate --checkpoint runs/recall_tiny --suite niah \
        --lengths 1024,2048,4096,8192

`--suite ppl` scores every token of the held-out split of a folder that
`gdn2_jax.data.prepare` wrote (token files named directly are scored whole) at the training
length (`--seq-len` to change it): token-weighted loss, perplexity, bits per token and, from the
metadata's byte counts, bits per byte (`gdn2_jax.perplexity`). The data must fit the model: its
vocabulary, end-of-document id and (where the training data's metadata is still readable) the
same tokenizer file.

`--suite niah` is RULER-style needle-in-a-haystack retrieval:

`--checkpoint` is a train.py workdir (or its `checkpoints/` folder); the latest step is read
unless `--step` names one. The model and how its tokens are spelled come from the config stored
with the checkpoint (`gdn2_jax.niah` has the tasks and the prompt formats):

- `data.kind="text"`: byte-level, one token per UTF-8 byte, RULER's English templates;
- `data.kind="recall"`: the synthetic recall vocabulary (key, value and filler token ranges);
- `data.kind="tokens"`: token files carry no tokenizer the repository knows, so such a
  checkpoint is refused with an error rather than scored with prompts it cannot spell.

Lengths are prompt tokens. Each prompt is answered by greedy generation, scored by exact match of
the answer's tokens; a table (tasks x lengths, % exact match) is printed and, with `--out`,
written as JSON with the per-sample outcomes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from gdn2_jax import config as config_lib
from gdn2_jax import niah, perplexity, sharding, trainer
from gdn2_jax.checkpoint import Checkpointer
from gdn2_jax.config import CheckpointConfig, Config, ConfigError, MeshConfig
from gdn2_jax.generate import generate

SUITES = {"niah": niah.TASKS, "ppl": ()}


def _parse_lengths(text: str) -> tuple[int, ...]:
    try:
        lengths = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lengths: expected integers, got {text!r}") from None
    if not lengths or min(lengths) < 1:
        raise argparse.ArgumentTypeError(f"--lengths: expected positive integers, got {text!r}")
    return lengths


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=Path, help="train.py workdir")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    parser.add_argument("--suite", choices=sorted(SUITES), default="niah")
    parser.add_argument("--data", nargs="+", help="ppl: prepared folder(s) or token files")
    parser.add_argument("--seq-len", type=int, help="ppl: window length (default: training's)")
    parser.add_argument("--max-batches", type=int, help="ppl: score only this many batches")
    parser.add_argument("--lengths", type=_parse_lengths, default=(1024, 2048, 4096, 8192))
    parser.add_argument("--tasks", help="comma-separated subset of the suite's tasks")
    parser.add_argument("--samples", type=int, default=50, help="prompts per task and length")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts")
    parser.add_argument("--out", type=Path, help="JSON file for the results")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a stored config field that changes only how the model computes, "
        "e.g. --set model.gdn2_backend=xla",
    )  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.suite == "ppl" and not args.data:
        parser.error("--suite ppl needs --data (a prepared folder or token files)")
    for name in ("samples", "batch_size", "seq_len", "max_batches"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def checkpoint_dir(path: Path) -> Path:
    """A workdir's `checkpoints/` folder, or the folder itself when it holds the steps."""
    inner = path / "checkpoints"
    if inner.is_dir():
        return inner
    if path.is_dir():
        return path
    raise FileNotFoundError(f"--checkpoint {path}: no such directory")


def load(path: Path, step: int | None = None, overrides=()) -> tuple[Config, nnx.Module, int]:
    """The stored config (with `overrides`), the model with the checkpoint's parameters, and
    the step read."""
    cfg, run, params, step = load_run(path, step, overrides)
    return cfg, nnx.merge(run.graphdef, params), step


def load_run(path: Path, step: int | None = None, overrides=()):
    """The stored config, the trainer's `Run` built from it on this machine's devices, the
    checkpoint's parameters and the step read."""
    ckpt = Checkpointer(checkpoint_dir(path), CheckpointConfig(async_save=False))
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise FileNotFoundError(f"--checkpoint {path}: no checkpoint steps in it")
        step = max(steps) if step is None else step
        if step not in steps:
            raise FileNotFoundError(f"--step {step}: not in {path} (it has {sorted(steps)})")
        cfg = config_lib.from_dict(Config, ckpt.saved_config(step))
        # The model is evaluated on whatever devices are here, not on the training mesh.
        cfg = config_lib.apply_overrides(dataclasses.replace(cfg, mesh=MeshConfig()), overrides)
        mesh = sharding.make_mesh(cfg.mesh)
        with jax.set_mesh(mesh):
            run = trainer.build(cfg, mesh)
            target = jax.tree.map(
                lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                run.abstract_state,
                run.state_shardings,
            )
            state = ckpt.restore_state(step, target)
    finally:
        ckpt.close()
    return cfg, run, state.params, step


def prompt_format(cfg: Config):
    """The vocabulary the prompts are spelled in, from the data the model was trained on."""
    if cfg.data.kind == "text":
        return niah.ByteFormat()
    if cfg.data.kind == "recall":
        return niah.RecallFormat(cfg.data.recall)
    raise ValueError(
        f"--checkpoint: the model was trained on token files (data.kind={cfg.data.kind!r}), "
        "whose tokenizer the repository does not know; NIAH prompts are spelled for byte-level "
        "(data.kind='text') or recall (data.kind='recall') models"
    )


def answer_all(model, batch: list[niah.Sample], batch_size: int) -> np.ndarray:
    """Greedy continuations [len(batch), longest answer]; short batches are padded with copies
    of their first prompt so that every call has one shape."""
    width = max(len(s.answer) for s in batch)
    rows = [s.prompt for s in batch] + [batch[0].prompt] * (batch_size - len(batch))
    out = generate(model, np.stack(rows), max_new_tokens=width)
    return np.asarray(out)[: len(batch), -width:]


def evaluate(model, fmt, tasks, lengths, *, samples: int, batch_size: int, seed: int,
             progress: bool = True) -> dict:  # fmt: skip
    """task -> length -> {"accuracy", "correct": [bool per sample]}."""
    results = {task: {} for task in tasks}
    total = sum(-(-len(tasks) * samples // batch_size) for _ in lengths)
    with tqdm(total=total, desc="niah", disable=not progress) as bar:
        for length in lengths:
            pending = niah.samples(fmt, tasks, length, samples, seed)
            outcomes = []
            for i in range(0, len(pending), batch_size):
                batch = pending[i : i + batch_size]
                generated = answer_all(model, batch, batch_size)
                outcomes += [niah.exact_match(s, g) for s, g in zip(batch, generated, strict=True)]
                bar.update(1)
            for task in tasks:
                hits = [o for s, o in zip(pending, outcomes, strict=True) if s.task == task]
                results[task][length] = {"accuracy": float(np.mean(hits)), "correct": hits}
    return results


def table(results: dict, lengths) -> str:
    lines = [
        "| task | " + " | ".join(str(n) for n in lengths) + " |",
        "|---|" + "---:|" * len(lengths),
    ]
    for task, by_length in results.items():
        cells = [f"{100 * by_length[n]['accuracy']:.1f}" for n in lengths]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main_ppl(args: argparse.Namespace) -> int:
    try:
        cfg, run, params, step = load_run(args.checkpoint, args.step, args.set)
        seq_len = args.seq_len or cfg.data.seq_len
        held = perplexity.held_out(cfg, args.data, seq_len)
    except (FileNotFoundError, ValueError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    with jax.set_mesh(run.mesh):
        result = perplexity.score(
            run, params, held, batch_size=args.batch_size, max_batches=args.max_batches,
            progress=not args.no_progress,
        )  # fmt: skip
    bpb = result["bits_per_byte"]
    print(
        f"{args.checkpoint} step {step} on {len(held.files)} held-out file(s), "
        f"{result['tokens']:,} tokens at length {seq_len}: loss {result['loss']:.4f}, "
        f"perplexity {result['perplexity']:.3f}"
        + (f", {bpb:.4f} bits per byte" if bpb is not None else "")
    )
    if args.out:
        record = {
            "checkpoint": str(args.checkpoint), "step": step, "suite": "ppl",
            "data": list(args.data), "seq_len": seq_len, "batch_size": args.batch_size,
            "wall_s": time.perf_counter() - t0, **result,
        }  # fmt: skip
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1))
    return 0


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.suite == "ppl":
        return main_ppl(args)
    suite = SUITES[args.suite]
    tasks = tuple(t.strip() for t in args.tasks.split(",")) if args.tasks else suite
    bad = [t for t in tasks if t not in suite]
    if bad:
        print(f"error: --tasks {','.join(bad)}: not in suite {args.suite} {suite}", file=sys.stderr)
        return 2
    try:
        cfg, model, step = load(args.checkpoint, args.step, args.set)
        fmt = prompt_format(cfg)
        for length in args.lengths:  # a length too short for a task fails before any work
            niah.samples(fmt, tasks, length, 1, args.seed)
    except (FileNotFoundError, ValueError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    results = evaluate(
        model, fmt, tasks, args.lengths, samples=args.samples, batch_size=args.batch_size,
        seed=args.seed, progress=not args.no_progress,
    )  # fmt: skip
    print(f"{args.checkpoint} step {step}, {args.samples} prompts per cell, % exact match:")
    print(table(results, args.lengths))
    if args.out:
        record = {
            "checkpoint": str(args.checkpoint), "step": step, "suite": args.suite,
            "tokenizer": type(fmt).__name__, "lengths": list(args.lengths),
            "samples": args.samples, "seed": args.seed, "wall_s": time.perf_counter() - t0,
            "results": results,
        }  # fmt: skip
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
