"""What a context axis of size 1 costs: the train step on one device, under a mesh without a
"context" axis and under the training mesh with `mesh.context=1`.

    python benchmarks/bench_context_overhead.py                    # 1.3B recurrent, 4 x 2048, bf16
    python benchmarks/bench_context_overhead.py --preset hybrid-1.3b --batch 1 --seq-len 8192
    python benchmarks/bench_context_overhead.py --small            # a CPU-sized model

Both programs trace to the same jaxpr (tests/test_context_train.py); this measures that the
compiled steps run alike. The two meshes alternate over `--rounds` rounds so that clock drift
hits both; prints each one's median step time (ms) and the ratio (context=1 / no axis), which
should be 1 within noise.
"""

import argparse
import statistics

import jax
from bench_ops import median_ms
from step_timing import random_batch

from gdn2_jax import sharding, trainer
from gdn2_jax.config import Config, DataConfig, MeshConfig, TrainConfig
from gdn2_jax.model_config import ModelConfig


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--preset", default="gdn2-1.3b")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--small", action="store_true", help="tiny model, 2 x 128 tokens")
    return parser.parse_args()


def make_config(args) -> Config:
    if args.small:
        args.preset, args.batch, args.seq_len = "tiny", 2, 128
    model = ModelConfig.preset(args.preset, dtype=args.dtype)
    data = DataConfig(kind="recall", seq_len=args.seq_len, batch_size=args.batch)
    return Config(model=model, data=data, train=TrainConfig(steps=1000))


def step_timer(cfg: Config, mesh):
    """A function that times `iters` train steps (median ms) on `mesh`, state carried along."""
    with jax.set_mesh(mesh):
        run = trainer.build(cfg, mesh)
        state = run.init_fn(jax.random.key(0))
        batch = sharding.host_local_to_global(random_batch(cfg), mesh)

    def time_steps(warmup, iters):
        nonlocal state

        def step():
            nonlocal state
            state, metrics = run.step_fn(state, batch)
            return metrics["loss"]

        with jax.set_mesh(mesh):
            return median_ms(step, warmup, iters, sync=jax.block_until_ready)

    return time_steps


def main():
    args = parse_args()
    cfg = make_config(args)
    device = jax.devices()[:1]
    auto = (jax.sharding.AxisType.Auto,) * 3
    meshes = {
        "no context axis": jax.make_mesh(
            (1, 1, 1), ("data", "fsdp", "tensor"), auto, devices=device
        ),
        "mesh.context=1": sharding.make_mesh(MeshConfig(data=1, context=1), devices=device),
    }
    timers = {name: step_timer(cfg, mesh) for name, mesh in meshes.items()}
    samples = {name: [] for name in timers}
    for r in range(args.rounds):
        for name, time_steps in timers.items():
            samples[name].append(time_steps(warmup=2 if r == 0 else 1, iters=args.iters))
    print(f"{jax.devices()[0].device_kind}: {args.preset} {args.batch}x{args.seq_len} {args.dtype}")
    medians = {name: statistics.median(times) for name, times in samples.items()}
    for name, ms in medians.items():
        rounds = ", ".join(f"{t:.2f}" for t in samples[name])
        print(f"  {name:16s} {ms:9.2f} ms/step (rounds: {rounds})")
    ratio = medians["mesh.context=1"] / medians["no context axis"]
    print(f"  ratio (context=1 / no axis): {ratio:.3f}")


if __name__ == "__main__":
    main()
