"""One forward+backward of the Pallas kernels and of fla's, for Nsight Compute's counters.

    ncu --clock-control none --profile-from-start off --section SpeedOfLight \
        --section Occupancy --section LaunchStats --section ComputeWorkloadAnalysis \
        --section SchedulerStats --section WarpStateStats --section MemoryWorkloadAnalysis \
        --csv --page details python3 benchmarks/profile_kernels.py --shape 4x4096 > ncu.csv
    python3 benchmarks/profile_kernels.py --summarize ncu.csv

Compilation and fla's autotuning run before the profiled range (`cudaProfilerStart`), so ncu
sees exactly one forward+backward of each implementation. `--summarize` turns ncu's CSV into one
row per kernel: duration, DRAM bandwidth, SM use, occupancy, issue-slot use and cycles per
issued instruction (a latency-bound launch issues rarely), cache hit rates, registers.
"""

import argparse
import collections
import csv
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# ncu's metric names (as its CSV prints them) -> the summary's column.
COLUMNS = {
    "Duration": "us",
    "DRAM Throughput": "dram %",
    "Memory Throughput": "mem %",
    "Compute (SM) Throughput": "sm %",
    "Achieved Occupancy": "occ %",
    "One or More Eligible": "issue %",
    "Warp Cycles Per Issued Instruction": "cyc/issue",
    "L1/TEX Hit Rate": "L1 hit %",
    "L2 Hit Rate": "L2 hit %",
    "Registers Per Thread": "regs",
    "Grid Size": "grid",
    "Block Size": "block",
}


def profiled_run(shape: str, config: str, with_fla: bool = True):
    import jax
    import jax.numpy as jnp
    import torch
    from bench_ops import Case, config_forward, make_arrays, op_forward, parse_config

    case = Case(*map(int, shape.split("x")))
    arrays = make_arrays(case)
    args = [jnp.asarray(arrays[n], jnp.float32 if n == "g" else jnp.bfloat16) for n in "qkvgbw"]
    fwd = config_forward(parse_config(config), case) if config else op_forward("pallas")

    def loss(*a):
        return jnp.sum(fwd(*a).astype(jnp.float32))

    grad = jax.jit(jax.grad(loss, argnums=tuple(range(6))))
    fla_step = _fla_step(arrays) if with_fla else (lambda: None)
    for _ in range(3):  # compile, autotune, warm caches
        jax.block_until_ready(grad(*args))
        fla_step()
    torch.cuda.profiler.start()
    jax.block_until_ready(grad(*args))
    fla_step()
    torch.cuda.profiler.stop()


def _fla_step(arrays):
    """One forward+backward of fla's chunk_gdn2 on the same inputs, synchronized."""
    import torch
    from fla.ops.gdn2 import chunk_gdn2

    tensors = [
        torch.tensor(arrays[n], device="cuda", dtype=torch.float32 if n == "g" else torch.bfloat16)
        for n in "qkvgbw"
    ]
    tensors = [t.requires_grad_() for t in tensors]

    def fla_step():
        o, _ = chunk_gdn2(*tensors)
        o.float().sum().backward()
        torch.cuda.synchronize()

    return fla_step


def _number(text: str) -> float:
    return float(text.replace(",", "")) if text.replace(",", "").replace(".", "").isdigit() else 0


def summarize(path: str) -> str:
    """ncu --csv --page details rows -> a markdown table, one row per kernel launch."""
    with open(path, newline="") as f:
        lines = [ln for ln in f if ln.startswith('"')]
    launches = collections.OrderedDict()
    for rec in csv.DictReader(lines):
        key = (rec["ID"], rec["Kernel Name"])
        name = rec["Metric Name"]
        # Some names repeat across sections in other units (Memory Throughput in byte/s).
        if name in COLUMNS and (rec["Metric Unit"] == "%") == COLUMNS[name].endswith("%"):
            value = rec["Metric Value"]
            if name == "Duration" and rec["Metric Unit"] in ("msecond", "ms"):
                value = str(_number(value) * 1e3)
            elif name == "Duration" and rec["Metric Unit"] in ("nsecond", "ns"):
                value = str(_number(value) / 1e3)
            launches.setdefault(key, {})[COLUMNS[name]] = value
    header = ["kernel", *COLUMNS.values()]
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (_, kernel), vals in launches.items():
        cells = [kernel[:60], *(vals.get(c, "") for c in COLUMNS.values())]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="4x4096", help="B x T (H = 16, K = V = 128, bf16)")
    parser.add_argument(
        "--config",
        default="",
        help="ChunkConfig choices for the Pallas core, e.g. structure=split_prep (default: the op)",
    )
    parser.add_argument("--no-fla", action="store_true", help="profile the Pallas kernels only")
    parser.add_argument("--summarize", metavar="CSV", help="print ncu's CSV as a table instead")
    args = parser.parse_args()
    if args.summarize:
        print(summarize(args.summarize))
    else:
        profiled_run(args.shape, args.config, with_fla=not args.no_fla)


if __name__ == "__main__":
    main()
