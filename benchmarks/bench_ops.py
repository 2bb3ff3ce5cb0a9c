"""Side-by-side timing of the GDN-2 op's backends (and fla's Triton `chunk_gdn2` on a GPU).

    python benchmarks/bench_ops.py                      # H = 16, K = V = 128 shapes (GPU)
    python benchmarks/bench_ops.py --small              # a CPU-sized shape
    python benchmarks/bench_ops.py --backends xla pallas --shapes 4x4096 1x16384
    python benchmarks/bench_ops.py --backends pallas --configs structure=fused structure=split
    python benchmarks/bench_ops.py --configs structure=split_prep,diag_grid=token

Prints medians (ms) of forward and forward+backward and each row's ratio to the baseline row
(fla when it runs, otherwise the first backend), the peak memory of forward+backward (JAX: the
compiled program's arguments + outputs + temporaries; torch: max_memory_allocated, inputs
included) and, with fla, each backend's forward error against fla's output on the same inputs.
Absolute CPU times mean little; ratios do. `--configs` adds a row "pallas[<overrides>]" per
comma-separated list of `ChunkConfig` fields (its string choices such as structure or
diag_blocks, its int tiles such as diag_block_k, its launches as warps:stages, e.g. diag=4:1):
the Pallas chunk core (what backend="pallas" runs, on these dense
shapes with no padding) under the dtype's tuned config with those fields replaced, so kernel
structures and variants are timed side by side with fla.
"""

import argparse
import dataclasses
import importlib.util
import os
import statistics
import time

# JAX and torch share the GPU in one process: JAX must not take 75% of it up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
import numpy as np

from gdn2_jax.ops import gated_delta_rule2
from gdn2_jax.ops.layout import dense_segments
from pallas_kernels import ChunkConfig, Launch, default_chunk_config, pallas_chunk_core
from pallas_kernels.config import CHUNK


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


def median_ms(fn, warmup, iters, sync=lambda x: x, inner=5):
    """Median over `iters` samples of `inner` back-to-back calls, synchronized once per sample:
    the device work, with host dispatch overlapped as in a training loop."""
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        for _ in range(inner):
            out = fn()
        sync(out)
        times.append((time.perf_counter() - start) * 1e3 / inner)
    return statistics.median(times)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def op_forward(backend):
    def fwd(*a):
        return gated_delta_rule2(*a, backend=backend)[0]

    return fwd


def _parse_field(field: dataclasses.Field, value: str):
    if field.type is Launch:  # "warps:stages"
        warps, _, stages = value.partition(":")
        return Launch(int(warps), int(stages or 1))
    if field.type == int | None:
        return None if value.lower() == "none" else int(value)
    return int(value) if field.type is int else value


def parse_config(overrides: str) -> dict:
    """ "structure=split,diag_block_k=32,diag=4:1" -> the ChunkConfig fields it replaces
    (strings, ints or "none" where the field may be None, and launches as warps:stages)."""
    kinds = (str, int, int | None, Launch)
    fields = {f.name: f for f in dataclasses.fields(ChunkConfig) if f.type in kinds}
    out = {}
    for item in filter(None, (x.strip() for x in overrides.split(","))):
        name, sep, value = item.partition("=")
        if not sep or name not in fields:
            names = ", ".join(sorted(fields))
            raise ValueError(f"--configs: {item!r} is not FIELD=VALUE with FIELD one of {names}")
        try:
            out[name] = _parse_field(fields[name], value)
        except ValueError as err:
            raise ValueError(f"--configs: {item!r}: {err}") from err
    return out


def config_forward(overrides: dict[str, str], case):
    """The Pallas chunk core under the dtype's tuned ChunkConfig with `overrides`, from a zero
    initial state."""
    if case.T % CHUNK:
        raise ValueError(f"--configs needs T a multiple of {CHUNK}, got T={case.T}")
    cfg = dataclasses.replace(default_chunk_config(jnp.dtype(case.dtype)), **overrides)
    h0s = jnp.zeros((2, case.B, case.H, case.K, case.V), jnp.float32)
    segments = dense_segments(case.T // CHUNK)

    interpret = jax.default_backend() != "gpu"  # off a GPU: interpret mode, for a smoke run

    def fwd(*a):
        core_args = (h0s, segments, case.K**-0.5, CHUNK, cfg, interpret)
        return pallas_chunk_core(*a, *core_args)[0]

    return fwd


def time_jax(fwd, arrays, case, warmup, iters):
    dtype = jnp.dtype(case.dtype)
    args = [jnp.asarray(arrays[n], jnp.float32 if n == "g" else dtype) for n in "qkvgbw"]

    def loss(*a):
        return jnp.sum(fwd(*a).astype(jnp.float32))

    fwd_jit = jax.jit(fwd)
    grad_jit = jax.jit(jax.grad(loss, argnums=tuple(range(6))))
    mem = grad_jit.lower(*args).compile().memory_analysis()
    peak = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
    sync = jax.block_until_ready
    return Timing(
        median_ms(lambda: fwd_jit(*args), warmup, iters, sync),
        median_ms(lambda: grad_jit(*args), warmup, iters, sync),
        peak / 2**30,
        np.asarray(fwd_jit(*args).astype(jnp.float32)),
    )


@dataclasses.dataclass
class Timing:
    fwd_ms: float
    fwd_bwd_ms: float
    peak_gib: float
    output: np.ndarray


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
            return chunk_gdn2(*args)[0]

    def fwd_bwd():
        o, _ = chunk_gdn2(*args)
        o.float().sum().backward()

    def sync(_):
        torch.cuda.synchronize()

    fwd_ms = median_ms(fwd, warmup, iters, sync)
    fwd_bwd_ms = median_ms(fwd_bwd, warmup, iters, sync)
    for a in args:
        a.grad = None
    # Inputs stay allocated across the reset, so they count, as JAX's arguments do.
    torch.cuda.reset_peak_memory_stats()
    fwd_bwd()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    output = fwd().float().cpu().numpy()
    return Timing(fwd_ms, fwd_bwd_ms, peak / 2**30, output)


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
    parser.add_argument(
        "--configs", nargs="*", default=[], help="pallas core rows: ChunkConfig FIELD=VALUE,..."
    )
    parser.add_argument("--no-fla", action="store_true", help="skip fla (its autotuning)")
    return parser.parse_args()


@dataclasses.dataclass
class Row:
    """One line of the table: a case, an implementation, its timings and its ratio to the
    baseline (fla when it runs, otherwise the first backend)."""

    shape: str
    impl: str
    fwd_ms: float
    fwd_bwd_ms: float
    fwd_ratio: float
    fwd_bwd_ratio: float
    peak_gib: float
    err_vs_fla: float


def benchmark(cases, backends=None, *, warmup=3, iters=20, with_fla=None, configs=()):
    """Times every backend (and fla on a GPU) on every `Case`, and the Pallas chunk core under
    each of `configs` (`parse_config` strings); returns a list of `Row`.

    The importable entry of this script (the notebooks call it); `main` is its command line.
    """
    on_gpu = jax.default_backend() == "gpu"
    backends = backends or (["pallas", "xla"] if on_gpu else ["xla", "scan"])
    with_fla = fla_available() if with_fla is None else with_fla
    rows = []
    for case in cases:
        arrays = make_arrays(case)
        timings = {}
        if with_fla:
            timings["fla chunk_gdn2"] = time_fla(arrays, case, warmup, iters)
        for backend in backends:
            timings[backend] = time_jax(op_forward(backend), arrays, case, warmup, iters)
        for config in configs:
            fwd = config_forward(parse_config(config), case)
            try:
                timings[f"pallas[{config}]"] = time_jax(fwd, arrays, case, warmup, iters)
            except jax.errors.JaxRuntimeError as err:  # e.g. tiles over the shared memory
                print(f"pallas[{config}] did not run: {str(err).splitlines()[0]}", flush=True)
        base = next(iter(timings.values()))
        for name, t in timings.items():
            err = rel_err(t.output, base.output) if with_fla and t is not base else float("nan")
            rows.append(
                Row(
                    case.label, name, t.fwd_ms, t.fwd_bwd_ms, t.fwd_ms / base.fwd_ms,
                    t.fwd_bwd_ms / base.fwd_bwd_ms, t.peak_gib, err,
                )
            )  # fmt: skip
    return rows


def format_table(rows):
    """The printed table of `benchmark`'s rows, headed by the device."""
    width = max([16, *(len(r.impl) for r in rows)])
    header = (
        f"{'shape':<28} {'impl':<{width}} {'fwd ms':>9} {'fwd+bwd ms':>11}"
        f" {'fwd x':>7} {'f+b x':>7} {'peak GiB':>9} {'err vs fla':>10}"
    )
    lines = [f"device: {jax.devices()[0].device_kind}", header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.shape:<28} {r.impl:<{width}} {r.fwd_ms:>9.3f} {r.fwd_bwd_ms:>11.3f}"
            f" {r.fwd_ratio:>7.2f} {r.fwd_bwd_ratio:>7.2f} {r.peak_gib:>9.2f} {r.err_vs_fla:>10.1e}"
        )
    return "\n".join(lines)


def main():
    args = parse_args()
    if args.small:
        cases = [Case(1, 512, H=2, K=64, V=64, dtype=args.dtype)]
    else:
        cases = [
            Case(*map(int, s.split("x")), H=args.heads, K=args.dim, V=args.dim, dtype=args.dtype)
            for s in args.shapes
        ]
    rows = []
    for case in cases:
        # A shape's rows print as soon as they are measured, so a run cut by a time limit still
        # reports the shapes it finished.
        case_rows = benchmark(
            [case],
            args.backends,
            warmup=args.warmup,
            iters=args.iters,
            with_fla=False if args.no_fla else None,
            configs=args.configs,
        )
        print(format_table(case_rows), flush=True)
        rows += case_rows
    if len(cases) > 1:
        print(format_table(rows))


if __name__ == "__main__":
    main()
