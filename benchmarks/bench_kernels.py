"""Per-kernel timings of the Pallas chunk kernels (and of fla's, through torch's profiler).

    python benchmarks/bench_kernels.py --shapes 4x4096 1x16384

Each Pallas launch is jitted alone on the intermediates the previous launch produced; times are
medians (ms). fla's kernels are read off one profiled forward+backward (device time per kernel).
"""

import argparse
import os
import statistics

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
from bench_ops import Case, fla_available, make_arrays, median_ms

from gdn2_jax.ops.layout import dense_segments
from pallas_kernels import DEFAULT_CHUNK_CONFIG
from pallas_kernels.chunk_bwd import chunk_dstate, chunk_intra_bwd, chunk_wy_bwd
from pallas_kernels.chunk_fwd import chunk_intra, chunk_state
from pallas_kernels.common import numerics_for


def pallas_stages(case: Case, cfg=DEFAULT_CHUNK_CONFIG):
    """(name, jitted fn, args) per launch, in forward then backward order."""
    dtype = jnp.dtype(case.dtype)
    x = make_arrays(case)
    q, k, v, g, b, w = (jnp.asarray(x[n], jnp.float32 if n == "g" else dtype) for n in "qkvgbw")
    num = numerics_for(dtype, interpret=jax.default_backend() != "gpu")
    scale = case.K**-0.5
    h0s = jnp.zeros((2, case.B, case.H, case.K, case.V), jnp.float32)
    seg = dense_segments(case.T // 64)
    kw = dict(cfg=cfg, num=num)
    intra_fn = jax.jit(lambda *a: chunk_intra(*a, scale=scale, **kw))
    intra = intra_fn(q, k, v, g, b, w)
    state_fn = jax.jit(lambda i: chunk_state(i, h0s, seg, dtype, **kw, save=False))
    save_fn = jax.jit(lambda i: chunk_state(i, h0s, seg, dtype, **kw, save=True))
    o, finals, s0, r = save_fn(intra)
    do, dfin = jnp.ones_like(o), jnp.ones_like(finals)
    dstate_fn = jax.jit(lambda i, d: chunk_dstate(i, s0.shape, seg, d, dfin, **kw))
    dsc, dr, _ = dstate_fn(intra, do)
    wy_fn = jax.jit(
        lambda i, d: chunk_wy_bwd(q, k, v, b, w, d, i, (s0, r), (dsc, dr), scale=scale, **kw)
    )
    _, _, *wy = wy_fn(intra, do)
    intra_bwd_fn = jax.jit(lambda G, wy: chunk_intra_bwd(q, k, b, G, wy, scale=scale, **kw))
    return [
        ("fwd intra", intra_fn, (q, k, v, g, b, w)),
        ("fwd state", state_fn, (intra,)),
        ("fwd state+save", save_fn, (intra,)),
        ("bwd dstate", dstate_fn, (intra, do)),
        ("bwd wy", wy_fn, (intra, do)),
        ("bwd intra", intra_bwd_fn, (intra["G"], wy)),
    ]


def fla_kernel_times(case: Case):
    """Device ms per fla kernel over one forward+backward (median of 5 profiled runs)."""
    import torch
    from fla.ops.gdn2 import chunk_gdn2
    from torch.profiler import ProfilerActivity, profile

    x = make_arrays(case)
    dtype = getattr(torch, case.dtype)
    args = [
        torch.tensor(
            x[n], device="cuda", dtype=torch.float32 if n == "g" else dtype
        ).requires_grad_()
        for n in "qkvgbw"
    ]
    for _ in range(3):
        chunk_gdn2(*args)[0].float().sum().backward()
    torch.cuda.synchronize()
    runs = []
    for _ in range(5):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            chunk_gdn2(*args)[0].float().sum().backward()
            torch.cuda.synchronize()
        runs.append(
            {e.key: e.device_time_total / 1e3 for e in prof.key_averages() if e.device_time_total}
        )
    return {n: statistics.median(r.get(n, 0.0) for r in runs) for n in runs[0]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["4x4096", "1x16384"])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    for shape in args.shapes:
        case = Case(*map(int, shape.split("x")), dtype=args.dtype)
        print(f"\n{case.label}")
        total = 0.0
        for name, fn, fn_args in pallas_stages(case):
            ms = median_ms(lambda fn=fn, a=fn_args: fn(*a), 3, args.iters, jax.block_until_ready)
            total += 0.0 if name == "fwd state" else ms
            print(f"  pallas {name:<16} {ms:8.3f} ms")
        print(f"  pallas fwd(save)+bwd kernels {total:8.3f} ms")
        if fla_available():
            times = fla_kernel_times(case)
            for name, ms in sorted(times.items(), key=lambda kv: -kv[1]):
                print(f"  fla {ms:8.3f} ms  {name[:90]}")
            print(f"  fla total {sum(times.values()):8.3f} ms")


if __name__ == "__main__":
    main()
