"""Training-step throughput of the 1.3B models: this project's train step beside the PyTorch + fla
peer (`torch_peer.py`), one table.

    python benchmarks/bench_train.py                    # GPU: both 1.3B presets, 8x2048 and 1x16384
    python benchmarks/bench_train.py --no-peer --variants loss_chunks=1 loss_chunks=8 \\
        "loss_chunks=8,remat=true,remat_policy=dots_and_gdn2_op"
    python benchmarks/bench_train.py --presets gdn2-1.3b --shapes 4x4096 --peer-hybrid

Ours is the step `train.py` runs (`gdn2_jax.trainer.build`: bf16 compute over float32
parameters, AdamW, clipping, jitted with the state donated) on random tokens, compiled once per
preset, shape and variant; a variant is a comma-separated list of `ModelConfig` overrides (the
`--set model.*` keys of train.py). The peer runs for the recurrent presets, and for the hybrid
ones with `--peer-hybrid` (compiled flex_attention). Per row: tokens/s and the median step time
over `--steps` timed steps after `--warmup`, peak memory (ours: the compiled step's arguments,
outputs and temporaries; the peer: torch's max_memory_allocated), MFU (analytic FLOPs,
`gdn2_jax.metrics`, against the device's bf16 peak) and tokens/s over the peer's. On a CPU it
runs the tiny presets at 2x64 without the peer, so CI can execute it.
"""

import argparse
import dataclasses
import json
import os

# JAX and torch share the GPU in one process: JAX must not take 75% of it up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
from step_timing import time_train_step

from gdn2_jax import metrics, sharding
from gdn2_jax.config import Config, DataConfig, MeshConfig, TrainConfig, apply_overrides
from gdn2_jax.model_config import ModelConfig

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Row:
    preset: str
    shape: str
    impl: str
    tokens_per_s: float
    step_ms: float
    peak_gib: float
    mfu: float | None
    setup_s: float
    vs_peer: float | None = None


def parse_args(argv=None):
    on_gpu = jax.default_backend() == "gpu"
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument(
        "--presets", nargs="+", default=["gdn2-1.3b", "hybrid-1.3b"] if on_gpu else ["tiny"]
    )
    parser.add_argument(
        "--shapes", nargs="+", default=["8x2048", "1x16384"] if on_gpu else ["2x64"]
    )
    parser.add_argument(
        "--variants", nargs="+", default=["loss_chunks=8"], help='ModelConfig overrides, "" none'
    )
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--no-peer", action="store_true", help="skip the PyTorch + fla peer")
    parser.add_argument("--peer-hybrid", action="store_true", help="also the hybrid's peer")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    for shape in args.shapes:
        parse_shape(shape)
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1")
    if not on_gpu and not args.no_peer:
        print("no GPU: the PyTorch + fla peer (Triton kernels) is skipped")
        args.no_peer = True
    return args


def parse_shape(shape: str) -> tuple[int, int]:
    try:
        batch, seq_len = (int(x) for x in shape.split("x"))
    except ValueError:
        raise SystemExit(f"--shapes: {shape!r} is not BATCHxSEQ_LEN, e.g. 8x2048") from None
    return batch, seq_len


def make_config(preset: str, batch: int, seq_len: int, dtype: str, variant: str) -> Config:
    model = ModelConfig.preset(preset, dtype=dtype)
    cfg = Config(
        model=model,
        data=DataConfig(kind="recall", seq_len=seq_len, batch_size=batch),
        mesh=MeshConfig(data=1),
        train=TrainConfig(steps=1000),
    )
    overrides = [f"model.{kv.strip()}" for kv in variant.split(",") if kv.strip()]
    return apply_overrides(cfg, overrides)


def time_ours(cfg: Config, warmup: int, steps: int) -> dict:
    """Compiles the train step once on one device, then times it with the state carried along."""
    mesh = sharding.make_mesh(cfg.mesh, devices=jax.devices()[:1])
    return time_train_step(cfg, mesh, warmup, steps)


def _row(preset, shape, impl, result, tokens, flops_per_token, peak_flops) -> Row:
    tokens_per_s = tokens / result["step_s"]
    return Row(
        preset=preset,
        shape=shape,
        impl=impl,
        tokens_per_s=tokens_per_s,
        step_ms=result["step_s"] * 1e3,
        peak_gib=result["peak_bytes"] / GIB,
        mfu=tokens_per_s * flops_per_token / peak_flops if peak_flops else None,
        setup_s=result.get("setup_s", result.get("warmup_s", 0.0)),
    )


def _wants_peer(args, model_cfg: ModelConfig) -> bool:
    return not args.no_peer and ("swa" not in model_cfg.block_pattern or args.peer_hybrid)


def time_peers(args) -> dict[tuple[str, str], dict]:
    """The peer's timings, all before ours: torch hands its memory back after each, while JAX's
    allocator keeps what it grew to."""
    peers = {}
    for preset in args.presets:
        for shape in args.shapes:
            batch, seq_len = parse_shape(shape)
            model_cfg = make_config(preset, batch, seq_len, args.dtype, "").model
            if _wants_peer(args, model_cfg):
                import torch_peer  # torch and fla load only when the peer runs

                peers[preset, shape] = peer = torch_peer.time_peer(
                    model_cfg, batch, seq_len, warmup=args.warmup, steps=args.steps
                )
                print(f"peer {preset} {shape}: {peer['step_s'] * 1e3:.1f} ms a step", flush=True)
    return peers


def bench(args) -> list[Row]:
    peak_flops = metrics.peak_flops(jax.devices()[0].device_kind)
    peers = time_peers(args)
    rows = []
    for preset in args.presets:
        for shape in args.shapes:
            batch, seq_len = parse_shape(shape)
            tokens = batch * seq_len
            group = []
            for variant in args.variants:
                cfg = make_config(preset, batch, seq_len, args.dtype, variant)
                result = time_ours(cfg, args.warmup, args.steps)
                flops = result["flops_per_token"]
                impl = f"ours {variant or 'defaults'}"
                group.append(_row(preset, shape, impl, result, tokens, flops, peak_flops))
                # A 1.3B step compiles for minutes: each row shows as soon as it is timed.
                print_table(group[-1:], header=not rows and len(group) == 1)
            if (preset, shape) in peers:
                peer = _row(preset, shape, "peer torch+fla", peers[preset, shape], tokens, flops,
                            peak_flops)  # fmt: skip
                group = [dataclasses.replace(r, vs_peer=r.tokens_per_s / peer.tokens_per_s)
                         for r in group] + [peer]  # fmt: skip
            if (preset, shape) in peers:
                print_table(group, header=False)
            rows += group
            if args.json:
                write_json(args.json, rows)
    return rows


def write_json(path: str, rows: list[Row]) -> None:
    with open(path, "w") as f:
        json.dump([dataclasses.asdict(r) for r in rows], f, indent=1)


def print_table(rows: list[Row], *, header: bool = True) -> None:
    if header:
        print(f"{jax.devices()[0].device_kind}, {jax.default_backend()}")
        print(
            f"{'preset':12s} {'shape':8s} {'implementation':56s} {'K tok/s':>8s} {'step ms':>9s} "
            f"{'peak GiB':>8s} {'MFU':>6s} {'vs peer':>7s} {'setup s':>7s}"
        )
    for r in rows:
        mfu = f"{r.mfu:6.1%}" if r.mfu is not None else f"{'-':>6s}"
        ratio = f"{r.vs_peer:7.2f}" if r.vs_peer is not None else f"{'-':>7s}"
        print(
            f"{r.preset:12s} {r.shape:8s} {r.impl:56s} {r.tokens_per_s / 1e3:8.2f} "
            f"{r.step_ms:9.2f} {r.peak_gib:8.2f} {mfu} {ratio} {r.setup_s:7.1f}",
            flush=True,
        )


def main(argv=None):
    args = parse_args(argv)
    bench(args)


if __name__ == "__main__":
    main()
