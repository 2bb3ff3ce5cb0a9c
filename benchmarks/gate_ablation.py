"""Gate ablation: GDN-2 against b-only / w-only, negative eigenvalues, KDA and Gated DeltaNet on
recall tasks that load the state, several seeds per variant (`gdn2_jax.ablation`).

    python benchmarks/gate_ablation.py --preset h200 --out runs/gate_ablation
    python benchmarks/gate_ablation.py --preset tiny --out /tmp/abl   # CPU smoke run
    python benchmarks/gate_ablation.py --merge a/gate_ablation.json b/gate_ablation.json --out c

Writes `gate_ablation.json` (per-run curves and final accuracies, rewritten after each variant)
and `gate_ablation.md` (the table of means and 95% intervals, and the measured ordering) to
`--out`, and prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from gdn2_jax import ablation


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--preset", choices=ablation.PRESET_NAMES, default="h200")
    parser.add_argument("--out", required=True, type=Path, help="directory for the results")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (preset's if unset)")
    parser.add_argument("--seeds", type=int, help="seeds per variant (preset's if unset)")
    parser.add_argument(
        "--variants", help=f"comma-separated subset of {','.join(ablation.VARIANTS)}"
    )
    parser.add_argument("--lr", type=float, help="peak learning rate (the preset's if unset)")
    parser.add_argument(
        "--rows", type=int, help="sequences per task, seed and step (the preset's if unset)"
    )
    parser.add_argument("--backend", help="model.gdn2_backend (e.g. xla; the preset's if unset)")
    parser.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        metavar="JSON",
        help="write one result from these gate_ablation.json files (variants run in pieces) "
        "instead of training",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def config_from(args: argparse.Namespace) -> ablation.AblationConfig:
    cfg = ablation.preset(args.preset)
    changes = {}
    if args.steps is not None:
        changes["steps"] = args.steps
        changes["eval_every"] = min(cfg.eval_every, args.steps)
    if args.seeds is not None:
        changes["seeds"] = args.seeds
    if args.variants:
        changes["variants"] = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    if args.rows is not None:
        changes["batch_size"] = args.rows
    if args.lr is not None:
        changes["optimizer"] = dataclasses.replace(cfg.optimizer, lr=args.lr)
    if args.backend:
        changes["model"] = dataclasses.replace(cfg.model, gdn2_backend=args.backend)
    return cfg.replace(**changes)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    # A level on the library's logger, not a new root handler: basicConfig is a no-op once
    # JAX has installed one, and a forced handler would outlive a caller's stderr (pytest's).
    logging.getLogger("gdn2_jax").setLevel(logging.INFO)
    try:
        if args.merge:
            results = ablation.merge([json.loads(p.read_text()) for p in args.merge])
        else:
            cfg = config_from(args)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        (args.out / "gate_ablation.json").write_text(json.dumps(results))
    else:
        results = ablation.run(cfg, args.out / "gate_ablation.json", progress=not args.no_progress)
    report = ablation.report(results)
    (args.out / "gate_ablation.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
