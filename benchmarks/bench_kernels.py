"""Per-kernel timings of the Pallas chunk kernels (and of fla's, through torch's profiler).

    python benchmarks/bench_kernels.py --shapes 4x4096 1x16384
    python benchmarks/bench_kernels.py --shapes 4x4096 --sweep   # launch-config variants too
    python benchmarks/bench_kernels.py --shapes 4x4096 --sweep "fwd diag"   # one stage's
    python benchmarks/bench_kernels.py --shapes 4x4096 --structures fused split   # both forwards

Each Pallas launch is jitted alone on the intermediates the previous launch produced; times are
medians (ms). fla's kernels are read off one profiled forward+backward (device time per kernel).
With --sweep every launch is also timed under the ChunkConfig variants in `SWEEP`, which is how the
defaults in pallas_kernels/config.py were chosen. --structures times the stages under each
`ChunkConfig.structure`; a split structure adds its launches alone (solve and WY apply; state-only
pass and output), each on the intermediates it reads. A sweep runs under the last structure listed.
"""

import argparse
import dataclasses
import functools
import os
import statistics

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
from bench_ops import Case, fla_available, make_arrays, median_ms

from gdn2_jax.ops.layout import dense_segments
from pallas_kernels import ChunkConfig, Launch, default_chunk_config
from pallas_kernels.chunk import FORWARDS
from pallas_kernels.chunk_bwd import chunk_dstate, chunk_intra_bwd, chunk_wy_bwd
from pallas_kernels.chunk_fwd import chunk_cumsum, chunk_diag
from pallas_kernels.chunk_fwd_split import chunk_output, chunk_solve, chunk_states, chunk_wy_apply
from pallas_kernels.common import numerics_for
from pallas_kernels.config import STRUCTURES

# "fwd diag" (the cumsum and the diagonal-block launch) is also part of "fwd intra", which runs
# all three state-independent steps; "fwd state" is "fwd state+save" without the stores.
STAGES = (
    "fwd diag",
    "fwd intra",
    "fwd state",
    "fwd state+save",
    "bwd dstate",
    "bwd wy",
    "bwd intra",
)
PARTS = ("fwd diag", "fwd state")  # not added to the total
# The split forward's launches, each alone (parts of "fwd intra" and "fwd state+save").
SPLIT_PARTS = ("fwd solve", "fwd wy", "fwd states", "fwd output+save")

# A stored column cannot take later K slices' sums: stored columns run whole K rows.
STORE_COLUMNS = {"diag_store": "columns", "diag_loop_block_k": None}
# Per stage: the config fields it reads, and values to try for them.
SWEEP = {
    "fwd diag": [{"cumsum": "pallas"}, {"cumsum": "pallas", "cumsum_block_k": 32}]
    + [{"diag_grid": "token", "diag": Launch(w, 1)} for w in (1, 2, 4)]
    + [STORE_COLUMNS]
    + [
        {"diag": Launch(w, s), **store}
        for w, s in [(2, 2), (2, 3), (1, 1), (4, 1), (4, 3)]
        for store in (STORE_COLUMNS, {"diag_store": "tile"})
    ],
    # The default solve (doubling, 2 warps, K slices of 32, joint scores) spills 648 B a thread;
    # apart scores 96 B, slices of 16 32 B, pairs none (kernel_resources.py).
    "fwd solve": [
        {"diag_inverse": "substitution"},
        {"solve": "tf32x3"},
        {"solve": "tf32"},
        {"solve_scores": "apart"},
        {"intra_block_k": 16},
        {"intra_block_k": 16, "solve_scores": "apart"},
        {"solve_scores": "apart", "solve": "tf32"},
        {"solve_scores": "pairs"},
        {"solve_scores": "pairs", "intra_block_k": 64},
        {"solve_scores": "pairs", "intra": Launch(4, 1)},
        {"solve_scores": "pairs", "intra": Launch(2, 2)},
        {"intra": Launch(2, 2)},
    ]
    + [
        {"intra": Launch(w, 1), "intra_block_k": bk, "solve_scores": scores}
        for w, bk, scores in [
            (4, 32, "joint"),
            (4, 32, "apart"),
            (1, 32, "joint"),
            (2, 64, "apart"),
        ]
    ],
    "fwd wy": [
        {"wy_apply": Launch(w, s), "aux_block": bk}
        for w, s, bk in [(4, 1, 64), (4, 3, 64), (8, 2, 64), (2, 2, 64), (4, 2, 32), (4, 2, 128)]
    ],
    "fwd states": [
        {"state": Launch(w, s), "state_block_v": bv}
        for w, s, bv in [(4, 2, 32), (2, 2, 32), (4, 1, 64), (4, 3, 64), (8, 2, 128)]
    ],
    "fwd output+save": [
        {"output": Launch(w, s), "output_block_v": bv}
        for w, s, bv in [(4, 1, 64), (8, 2, 64), (4, 2, 32), (4, 2, 128), (8, 3, 128)]
    ],
    "fwd intra": [{"solve": "tf32x3"}, {"solve": "tf32"}]
    + [
        {"intra": Launch(w, s), "intra_block_k": bk}
        for w, s, bk in [(2, 1, 64), (8, 1, 64), (4, 2, 64), (4, 1, 32), (2, 1, 32)]
    ],
    "fwd state+save": [
        {"state": Launch(w, s), "state_block_v": bv}
        for w, s, bv in [
            (4, 1, 64),
            (4, 3, 64),
            (8, 2, 64),
            (4, 2, 32),
            (8, 2, 128),
            (4, 2, 16),
            (2, 2, 16),
            (2, 2, 32),
        ]
    ]
    + [{"state_parts": p} for p in (4, 8, 16)]
    + [{"state_parts": 8, "state_block_v": 32}],
    "bwd dstate": [
        {"dstate": Launch(w, s), "dstate_block_v": bv}
        for w, s, bv in [(4, 1, 64), (4, 3, 64), (8, 2, 64), (4, 2, 32), (8, 2, 128)]
    ],
    "bwd wy": [
        {"wy": Launch(w, s), "wy_block_k": bk, "wy_block_v": bv}
        for w, s, bk, bv in [(8, 1, 64, 64), (4, 1, 32, 64), (8, 1, 32, 64), (4, 1, 32, 128)]
    ],
    "bwd intra": [
        {"intra_bwd": Launch(w, s), "intra_bwd_block_k": bk}
        for w, s, bk in [(2, 1, 32), (8, 1, 32), (4, 2, 32), (4, 1, 64)]
    ]
    + [
        {"intra_bwd_diag": Launch(w, 1), "intra_bwd_diag_block_k": bk}
        for w, bk in [(4, 16), (4, 32), (2, 32), (1, 16)]
    ],
}


@dataclasses.dataclass
class Intermediates:
    """Each launch's inputs; the later fields are filled as the launches run in order."""

    inputs: tuple
    h0s: jax.Array
    segments: tuple
    intra: dict | None = None
    saved: tuple | None = None
    do: jax.Array | None = None
    dfinals: jax.Array | None = None
    dstate: tuple | None = None
    wy: tuple | None = None
    diag: tuple | None = None  # the diagonal launch's blocks, for the split solve alone


def op_inputs(case: Case) -> Intermediates:
    """The op's inputs (g float32, the rest in the case's dtype), a zero state, dense segments:
    all the forward intra launch reads."""
    dtype = jnp.dtype(case.dtype)
    x = make_arrays(case)
    inputs = tuple(jnp.asarray(x[n], jnp.float32 if n == "g" else dtype) for n in "qkvgbw")
    h0s = jnp.zeros((2, case.B, case.H, case.K, case.V), jnp.float32)
    return Intermediates(inputs, h0s, dense_segments(case.T // 64))


def base_config(case: Case, structure: str) -> ChunkConfig:
    return dataclasses.replace(default_chunk_config(jnp.dtype(case.dtype)), structure=structure)


def intermediates(case: Case, structure: str, forward_only=False, fns=None) -> Intermediates:
    """Every launch's inputs, produced by the default-config launches before it (with
    `forward_only`, the forward launches' only); `fns`: those launches' `stage_fns`, if built."""
    it = op_inputs(case)
    fns = fns or stage_fns(case, base_config(case, structure))
    it.intra = fns["fwd intra"](it)
    it.diag = fns["fwd diag"](it)
    o, finals, *it.saved = fns["fwd state+save"](it)
    if forward_only:
        return it
    it.do, it.dfinals = jnp.ones_like(o), jnp.ones_like(finals)
    dsc, dr, _ = fns["bwd dstate"](it)
    it.dstate = (dsc, dr)
    _, _, *it.wy = fns["bwd wy"](it)
    return it


def stage_fns(case: Case, cfg: ChunkConfig):
    """Stage name -> jitted function of an `Intermediates`, every launch under `cfg`."""
    dtype = jnp.dtype(case.dtype)
    num = numerics_for(dtype, interpret=jax.default_backend() != "gpu", solve=cfg.solve)
    kw = dict(cfg=cfg, num=num)
    scale = case.K**-0.5

    @jax.jit
    def diag(inputs):
        q, k, _, g, b, _ = inputs
        return chunk_diag(q, k, b, chunk_cumsum(g, **kw)[0], scale=scale, **kw)

    prep, state_pass = FORWARDS[cfg.structure]

    @jax.jit
    def intra(inputs):
        return prep(*inputs, scale=scale, **kw)

    @functools.partial(jax.jit, static_argnames="save")
    def state(i, h0s, seg, save):
        return state_pass(i, h0s, seg, dtype, **kw, save=save)

    @jax.jit
    def solve(inputs, G, diag):
        q, k, _, _, b, _ = inputs
        return chunk_solve(q, k, b, G, diag, scale=scale, **kw)

    @jax.jit
    def wy_apply(inputs, i):
        q, k, v, _, b, w = inputs
        return chunk_wy_apply(q, k, v, b, w, i["G"], i["gc"], i["ainv"], scale=scale, **kw)

    @jax.jit
    def states(i, h0s, seg):
        return chunk_states(i, h0s, seg, **kw)

    @jax.jit
    def output(i, s0):
        return chunk_output(i, s0, case.H, dtype, **kw, save=True)

    @jax.jit
    def dstate(i, saved, seg, do, dfin):
        return chunk_dstate(i, saved[0].shape, seg, do, dfin, **kw)

    @jax.jit
    def wy(inputs, i, do, saved, dst):
        q, k, v, _, b, w = inputs
        return chunk_wy_bwd(q, k, v, b, w, do, i, saved, dst, scale=scale, **kw)

    @jax.jit
    def intra_bwd(inputs, G, wy_parts):
        q, k, _, _, b, _ = inputs
        return chunk_intra_bwd(q, k, b, G, wy_parts, scale=scale, **kw)

    return {
        "fwd diag": lambda it: diag(it.inputs),
        "fwd intra": lambda it: intra(it.inputs),
        "fwd state": lambda it: state(it.intra, it.h0s, it.segments, False),
        "fwd state+save": lambda it: state(it.intra, it.h0s, it.segments, True),
        "bwd dstate": lambda it: dstate(it.intra, it.saved, it.segments, it.do, it.dfinals),
        "bwd wy": lambda it: wy(it.inputs, it.intra, it.do, it.saved, it.dstate),
        "bwd intra": lambda it: intra_bwd(it.inputs, it.intra["G"], it.wy),
        "fwd solve": lambda it: solve(it.inputs, it.intra["G"], it.diag),
        "fwd wy": lambda it: wy_apply(it.inputs, it.intra),
        "fwd states": lambda it: states(it.intra, it.h0s, it.segments),
        "fwd output+save": lambda it: output(it.intra, it.saved[0]),
    }


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


def split_parts(structure: str) -> tuple:
    """The SPLIT_PARTS that `structure` launches."""
    prep = SPLIT_PARTS[:2] if structure in ("split", "split_prep") else ()
    return prep + (SPLIT_PARTS[2:] if structure in ("split", "split_output") else ())


def time_stage(fn, it, iters):
    return median_ms(lambda: fn(it), 3, iters, jax.block_until_ready)


def sweep(case: Case, it: Intermediates, iters, stages, structure, limit=None):
    """Times each of `stages` under its SWEEP variants (the first `limit` of them)."""
    base = base_config(case, structure)
    for stage in stages:
        if stage in SPLIT_PARTS and stage not in split_parts(structure):
            continue
        for fields in SWEEP[stage][:limit]:
            label = " ".join(f"{k}={v}" for k, v in fields.items())
            try:
                ms = time_stage(
                    stage_fns(case, dataclasses.replace(base, **fields))[stage], it, iters
                )
                print(f"  sweep {structure} {stage:<16} {ms:8.3f} ms  {label}", flush=True)
            except jax.errors.JaxRuntimeError as err:  # e.g. shared memory over the limit
                print(f"  sweep {stage:<16}   failed   {label}: {str(err)[:120]}", flush=True)


def time_structure(case: Case, structure: str, iters: int, forward_only=False) -> Intermediates:
    """Prints every stage's time under `structure` (the forward's only, with `forward_only`);
    returns the intermediates it ran on."""
    fns = stage_fns(case, base_config(case, structure))
    it = intermediates(case, structure, forward_only, fns)
    stages = STAGES + split_parts(structure)
    if forward_only:
        stages = tuple(n for n in stages if n.startswith("fwd"))
    totals = {"fwd": 0.0, "fwd(save)+bwd": 0.0}
    for name in stages:
        ms = time_stage(fns[name], it, iters)
        totals["fwd"] += ms if name in ("fwd intra", "fwd state") else 0.0
        totals["fwd(save)+bwd"] += 0.0 if name in PARTS + SPLIT_PARTS else ms
        print(f"  pallas[{structure}] {name:<16} {ms:8.3f} ms", flush=True)
    for name, ms in totals.items():
        if name == "fwd" or not forward_only:
            print(f"  pallas[{structure}] {name} kernels {ms:8.3f} ms", flush=True)
    return it


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["4x4096", "1x16384"])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--sweep", nargs="*", choices=sorted(SWEEP), help="stages (default all)")
    parser.add_argument("--structures", nargs="+", default=["fused"], choices=STRUCTURES)
    parser.add_argument("--no-fla", action="store_true", help="skip fla (its autotuning)")
    parser.add_argument("--forward", action="store_true", help="only the forward's launches")
    parser.add_argument("--sweep-limit", type=int, help="the first N variants of each stage")
    args = parser.parse_args()
    for shape in args.shapes:
        case = Case(*map(int, shape.split("x")), dtype=args.dtype)
        print(f"\n{case.label}", flush=True)
        for structure in args.structures:
            it = time_structure(case, structure, args.iters, args.forward)
            if args.sweep is not None and structure == args.structures[-1]:
                stages = args.sweep or list(SWEEP)
                if args.forward:
                    stages = [n for n in stages if n.startswith("fwd")]
                sweep(case, it, args.iters, stages, structure, args.sweep_limit)
        if fla_available() and not args.no_fla:
            times = fla_kernel_times(case)
            for name, ms in sorted(times.items(), key=lambda kv: -kv[1]):
                print(f"  fla {ms:8.3f} ms  {name[:90]}")
            print(f"  fla total {sum(times.values()):8.3f} ms")


if __name__ == "__main__":
    main()
