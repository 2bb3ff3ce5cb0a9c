"""Side-by-side timing of the GDN-2 op's backends (and fla's Triton `chunk_gdn2` on a GPU).

    python benchmarks/bench_ops.py                      # DESIGN §7 shapes (GPU)
    python benchmarks/bench_ops.py --small              # a CPU-sized shape
    python benchmarks/bench_ops.py --backends xla pallas --shapes 4x4096 1x16384

Prints medians (ms) of forward and forward+backward and each row's ratio to the baseline row
(fla when it runs, otherwise the first backend). Absolute CPU times mean little; ratios do.
"""

import argparse
import dataclasses
import importlib.util
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from gdn2_jax.ops import gated_delta_rule2


@dataclasses.dataclass(frozen=True)
class Case:
    B: int
    T: int
    H: int = 16
    K: int = 128
    V: int = 128
    dtype: str = "bfloat16"

    @property
    def label(self):
        return f"{self.B}x{self.T} H{self.H} K{self.K} V{self.V} {self.dtype}"


def make_arrays(case: Case, seed=0):
    """Random inputs in range (normalized keys, sigmoid gates, g ≤ 0) as float32 numpy."""
    rng = np.random.default_rng(seed)
    qk_shape = (case.B, case.T, case.H, case.K)
    v_shape = (case.B, case.T, case.H, case.V)
    k = rng.standard_normal(qk_shape, np.float32)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    return dict(
        q=rng.standard_normal(qk_shape, np.float32),
        k=k,
        v=rng.standard_normal(v_shape, np.float32),
        g=-np.exp(rng.standard_normal(qk_shape, np.float32)) * 0.1,
        b=1 / (1 + np.exp(-rng.standard_normal(qk_shape, np.float32))),
        w=1 / (1 + np.exp(-rng.standard_normal(v_shape, np.float32))),
    )


def median_ms(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def time_jax(backend, arrays, case, warmup, iters):
    dtype = jnp.dtype(case.dtype)
    args = [jnp.asarray(arrays[n], jnp.float32 if n == "g" else dtype) for n in "qkvgbw"]

    def fwd(*a):
        return gated_delta_rule2(*a, backend=backend)[0]

    def loss(*a):
        return jnp.sum(fwd(*a).astype(jnp.float32))

    fwd_jit = jax.jit(fwd)
    grad_jit = jax.jit(jax.grad(loss, argnums=tuple(range(6))))
    return (
        median_ms(lambda: fwd_jit(*args).block_until_ready(), warmup, iters),
        median_ms(lambda: jax.block_until_ready(grad_jit(*args)), warmup, iters),
    )


def fla_available():
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("fla") is None:
        return False
    import torch

    return torch.cuda.is_available()


def time_fla(arrays, case, warmup, iters):
    import torch
    from fla.ops.gdn2 import chunk_gdn2

    dtype = getattr(torch, case.dtype)
    tensors = {
        n: torch.tensor(a, device="cuda", dtype=torch.float32 if n == "g" else dtype)
        for n, a in arrays.items()
    }
    args = [tensors[n].requires_grad_() for n in "qkvgbw"]

    def fwd():
        with torch.no_grad():
            chunk_gdn2(*args)
        torch.cuda.synchronize()

    def fwd_bwd():
        o, _ = chunk_gdn2(*args)
        o.float().sum().backward()
        torch.cuda.synchronize()

    return median_ms(fwd, warmup, iters), median_ms(fwd_bwd, warmup, iters)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=None, help="default: pallas xla on GPU")
    parser.add_argument("--shapes", nargs="+", default=["4x4096", "8x2048", "1x16384"])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=128, help="K = V")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--small", action="store_true", help="B=1 T=512 H=2 K=V=64 (CPU)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    return parser.parse_args()


def main():
    args = parse_args()
    on_gpu = jax.default_backend() == "gpu"
    backends = args.backends or (["pallas", "xla"] if on_gpu else ["xla", "scan"])
    if args.small:
        cases = [Case(1, 512, H=2, K=64, V=64, dtype=args.dtype)]
    else:
        cases = [
            Case(*map(int, s.split("x")), H=args.heads, K=args.dim, V=args.dim, dtype=args.dtype)
            for s in args.shapes
        ]
    with_fla = fla_available()
    rows = []
    for case in cases:
        arrays = make_arrays(case)
        timings = {}
        if with_fla:
            timings["fla chunk_gdn2"] = time_fla(arrays, case, args.warmup, args.iters)
        for backend in backends:
            timings[backend] = time_jax(backend, arrays, case, args.warmup, args.iters)
        base_fwd, base_both = next(iter(timings.values()))
        for name, (fwd, both) in timings.items():
            rows.append((case.label, name, fwd, both, fwd / base_fwd, both / base_both))
    print(f"device: {jax.devices()[0].device_kind}")
    header = (
        f"{'shape':<28} {'impl':<16} {'fwd ms':>9} {'fwd+bwd ms':>11} {'fwd x':>7} {'f+b x':>7}"
    )
    print(header)
    print("-" * len(header))
    for label, name, fwd, both, rf, rb in rows:
        print(f"{label:<28} {name:<16} {fwd:>9.3f} {both:>11.3f} {rf:>7.2f} {rb:>7.2f}")


if __name__ == "__main__":
    main()
