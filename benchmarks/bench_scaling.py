"""Scaling of the 1.3B train step over the devices of one host: mesh layouts, device counts, one
process for all devices or one process per device, one table plus JSON.

    python benchmarks/bench_scaling.py                          # every visible GPU, both presets
    python benchmarks/bench_scaling.py --presets gdn2-1.3b --devices 1 8 --layouts fsdp
    python benchmarks/bench_scaling.py --processes device       # one process per GPU
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/bench_scaling.py

Layouts (`--layouts`), on N devices: `data` (parameters replicated, rows split), `fsdp` (rows
and parameters split over all N), `fsdp_tensor` (fsdp over N / `--tensor`, heads, MLP width and
vocabulary over `--tensor`), `context` (each sequence split along its tokens over N). The batch
layouts are measured in weak scaling: every device gets `--shape` (rows x tokens), so N devices
run N times the rows. Context parallelism is measured in strong scaling: the sequence of
`--context-shapes` is the same at every N (one device runs it whole). Either way a row's
efficiency is its tokens/s per device over the one-device run of the same per-device work
(weak) or of the same sequence (strong): 1.0 is perfect scaling.

`--processes host` (default) drives all devices from this process; `--processes device` spawns
N local processes per device count, joined by `jax.distributed` with the coordinator on
localhost, each seeing one GPU through CUDA_VISIBLE_DEVICES (on a CPU: one device each). The
step is the one `train.py` runs (`step_timing`, shared with bench_train.py): bf16 compute over
float32 parameters, AdamW, random tokens. Per row: tokens/s per device, the median step time,
per-device peak memory of the compiled step, and the step's communication time from a
`jax.profiler` trace (`collectives.py`: summed all-reduce, all-gather, reduce-scatter,
collective-permute and all-to-all op times on one device, mean over this process's devices).
A CPU trace has no device ops: there the column says n/a, and CPU timings mean nothing.
NCCL's NVLink multicast is turned off (NCCL_NVLS_ENABLE=0) unless the environment sets it.
"""

import argparse
import dataclasses
import json
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import tempfile

# NVLink multicast (NVLS) is unsupported on the lent H200 machines: a program that uses it can
# put the host's GPUs out of service. Children inherit the setting.
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

import jax
from bench_train import GIB, make_config, parse_shape
from collectives import communication_ms_per_step
from step_timing import compile_step, peak_bytes, time_steps

from gdn2_jax import sharding
from gdn2_jax.config import MeshConfig

LAYOUTS = ("data", "fsdp", "fsdp_tensor", "context")
# The one-device run every layout's efficiency is measured against.
SINGLE = "single"


def layout_mesh(layout: str, num_devices: int, tensor: int = 2) -> MeshConfig:
    """The mesh of `layout` on `num_devices` devices."""
    if num_devices == 1:
        return MeshConfig(data=1)
    if layout == "data":
        return MeshConfig(data=num_devices)
    if layout == "fsdp":
        return MeshConfig(data=1, fsdp=num_devices)
    if layout == "fsdp_tensor":
        if tensor < 2 or num_devices % tensor:
            raise ValueError(f"fsdp_tensor: --tensor={tensor} must be >= 2 and divide "
                             f"{num_devices} devices")  # fmt: skip
        return MeshConfig(data=1, fsdp=num_devices // tensor, tensor=tensor)
    if layout == "context":
        return MeshConfig(data=1, context=num_devices)
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


@dataclasses.dataclass(frozen=True)
class Case:
    preset: str
    layout: str
    devices: int
    batch: int  # global rows
    seq_len: int
    scaling: str  # "weak" or "strong"


@dataclasses.dataclass(frozen=True)
class Row:
    preset: str
    layout: str
    devices: int
    processes: int
    shape: str  # global rows x tokens
    mesh: str  # the mesh axes of size > 1
    scaling: str
    status: str  # "ok" or why the case did not run
    tokens_per_s_per_device: float | None = None
    step_ms: float | None = None
    peak_gib: float | None = None
    comm_ms: float | None = None
    setup_s: float | None = None
    efficiency: float | None = None
    speedup: float | None = None


def plan(args) -> list[Case]:
    """Every case of the run: the one-device baselines first, then each device count."""
    weak = [layout for layout in args.layouts if layout != "context"]
    rows, seq_len = parse_shape(args.shape)
    cases = []
    for preset in args.presets:
        for n in sorted(set(args.devices) | {1}):
            if weak:
                names = [SINGLE] if n == 1 else [lay for lay in weak if _fits(lay, n, args)]
                cases += [Case(preset, lay, n, rows * n, seq_len, "weak") for lay in names]
            if "context" in args.layouts:
                for shape in args.context_shapes:
                    b, t = parse_shape(shape)
                    name = SINGLE if n == 1 else "context"
                    cases.append(Case(preset, name, n, b, t, "strong"))
    return cases


def _fits(layout: str, n: int, args) -> bool:
    return layout != "fsdp_tensor" or n % args.tensor == 0


def case_config(case: Case, args):
    mesh = layout_mesh(case.layout, case.devices, args.tensor)
    variant = args.context_variant if case.scaling == "strong" else args.variant
    cfg = make_config(case.preset, case.batch, case.seq_len, args.dtype, variant)
    return dataclasses.replace(cfg, mesh=mesh)


def _is_out_of_memory(error: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(error)


def run_case(case: Case, args, devices) -> Row:
    """Compiles and times one case on `devices` (all processes' devices of the mesh)."""
    cfg = case_config(case, args)
    axes = {k: v for k, v in dataclasses.asdict(cfg.mesh).items() if v > 1}
    row = Row(case.preset, case.layout, case.devices, jax.process_count(),
              f"{case.batch}x{case.seq_len}", ",".join(f"{k}={v}" for k, v in axes.items()) or "-",
              case.scaling, "ok")  # fmt: skip
    try:
        step = compile_step(cfg, sharding.make_mesh(cfg.mesh, devices=devices))
        times = time_steps(step, args.warmup, args.steps)
        comm = None
        if args.profile_steps:
            comm = communication_ms_per_step(
                lambda: time_steps(step, 0, args.profile_steps), args.profile_steps
            )
    except jax.errors.JaxRuntimeError as e:
        if not _is_out_of_memory(e):
            raise
        return dataclasses.replace(row, status="out of memory: " + str(e).splitlines()[0][:200])
    step_s = statistics.median(times)
    return dataclasses.replace(
        row,
        tokens_per_s_per_device=case.batch * case.seq_len / step_s / case.devices,
        step_ms=step_s * 1e3,
        peak_gib=peak_bytes(step.compiled) / GIB,
        comm_ms=comm,
        setup_s=step.setup_s,
    )


def with_efficiency(rows: list[Row]) -> list[Row]:
    """Each row's tokens/s per device over its one-device baseline: the single-device run of the
    same per-device shape (weak) or of the same sequence (strong)."""

    def per_device_shape(r):
        b, t = parse_shape(r.shape)
        return (b // r.devices, t) if r.scaling == "weak" else (b, t)

    base = {(r.preset, r.scaling, per_device_shape(r)): r for r in rows if r.layout == SINGLE}
    out = []
    for r in rows:
        b = base.get((r.preset, r.scaling, per_device_shape(r)))
        if r.status == "ok" and b is not None and b.status == "ok":
            eff = r.tokens_per_s_per_device / b.tokens_per_s_per_device
            r = dataclasses.replace(r, efficiency=eff, speedup=eff * r.devices)
        out.append(r)
    return out


def _fmt(x, spec, missing="-"):
    return f"{x:{spec}}" if x is not None else f"{missing:>{spec.split('.')[0]}}"


def print_header(device_kind: str, platform: str) -> None:
    print(f"{device_kind}, {platform}")
    print(f"{'preset':12s} {'layout':12s} {'mesh':16s} {'dev':>3s} {'proc':>4s} {'shape':>9s} "
          f"{'scaling':7s} {'K tok/s/dev':>11s} {'step ms':>9s} {'eff':>6s} {'peak GiB':>8s} "
          f"{'comm ms':>8s} {'setup s':>7s} status", flush=True)  # fmt: skip


def print_row(r: Row, platform: str) -> None:
    tps = r.tokens_per_s_per_device / 1e3 if r.tokens_per_s_per_device else None
    comm_missing = "n/a" if platform == "cpu" else "-"
    print(
        f"{r.preset:12s} {r.layout:12s} {r.mesh:16s} {r.devices:3d} {r.processes:4d} "
        f"{r.shape:>9s} {r.scaling:7s} {_fmt(tps, '11.2f')} {_fmt(r.step_ms, '9.2f')} "
        f"{_fmt(r.efficiency, '6.1%')} {_fmt(r.peak_gib, '8.2f')} "
        f"{_fmt(r.comm_ms, '8.2f', comm_missing)} {_fmt(r.setup_s, '7.1f')} {r.status}",
        flush=True,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _worker_env(rank: int, platform: str) -> dict[str, str]:
    """One device per process: the rank-th visible GPU, or one CPU device."""
    env = dict(os.environ)
    if platform == "gpu":
        visible = env.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(jax.device_count())]
        env["CUDA_VISIBLE_DEVICES"] = ids[rank]
    else:
        flags = [f for f in env.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]  # fmt: skip
        env["XLA_FLAGS"] = " ".join([*flags, "--xla_force_host_platform_device_count=1"])
        env["JAX_PLATFORMS"] = "cpu"
    return env


def launch(argv: list[str], num_processes: int, platform: str) -> list[Row]:
    """Runs this script's cases on `num_processes` devices as that many local processes joined
    by jax.distributed; returns process 0's rows."""
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="gdn2-scaling-") as tmp:
        out = pathlib.Path(tmp) / "rows.json"
        worker = ["--devices", str(num_processes), "--worker",
                  f"localhost:{port},{num_processes}", "--rows-out", str(out)]  # fmt: skip
        procs = [
            subprocess.Popen(
                [sys.executable, __file__, *argv, *worker, "--process-id", str(rank)],
                env=_worker_env(rank, platform),
            )
            for rank in range(num_processes)
        ]
        codes = [p.wait() for p in procs]
        if any(codes):
            raise RuntimeError(f"{num_processes} worker processes exited with {codes}")
        return [Row(**r) for r in json.loads(out.read_text())]


def join_job(argv: list[str]) -> None:
    """In a launched process, joins the job before anything touches a JAX backend."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--worker")
    p.add_argument("--process-id", type=int, default=0)
    known, _ = p.parse_known_args(argv)
    if known.worker:
        coordinator, num = known.worker.rsplit(",", 1)
        jax.distributed.initialize(coordinator, int(num), known.process_id)


def worker_main(args) -> None:
    """A launched process: run the cases of its device count; process 0 writes the rows."""
    cases = [c for c in plan(args) if c.devices == jax.process_count()]
    rows = [run_case(c, args, jax.devices()) for c in cases]
    if jax.process_index() == 0:
        pathlib.Path(args.rows_out).write_text(json.dumps([dataclasses.asdict(r) for r in rows]))


def parse_args(argv=None):
    on_gpu = jax.default_backend() == "gpu"
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument(
        "--presets",
        nargs="+",
        default=["gdn2-1.3b", "hybrid-1.3b"] if on_gpu else ["tiny", "tiny-hybrid"],
    )
    p.add_argument(
        "--devices",
        nargs="+",
        type=int,
        help="device counts (default: 1, 2, 4, 8 up to the visible devices)",
    )
    p.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    p.add_argument(
        "--shape",
        default="8x2048" if on_gpu else "2x64",
        help="rows x tokens per device (weak scaling of the batch layouts)",
    )
    p.add_argument(
        "--context-shapes",
        nargs="+",
        default=["1x65536"] if on_gpu else ["1x256"],
        help="global rows x tokens of the context layout (strong scaling)",
    )
    p.add_argument("--tensor", type=int, default=2, help="tensor axis size of fsdp_tensor")
    p.add_argument("--variant", default="loss_chunks=8", help="ModelConfig overrides, a,b=..")
    p.add_argument(
        "--context-variant",
        default="loss_chunks=8,remat=true,remat_policy=dots_and_gdn2_op",
        help="ModelConfig overrides of the context cases",
    )
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--profile-steps", type=int, default=2, help="traced steps (0: no trace)")
    p.add_argument(
        "--processes",
        choices=("host", "device"),
        default="host",
        help="one process for all devices, or one per device (jax.distributed)",
    )
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--process-id", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--rows-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    _check_args(p, args)
    return args


def _check_args(parser, args) -> None:
    parse_shape(args.shape)
    for shape in args.context_shapes:
        parse_shape(shape)
    if args.warmup < 1 or args.steps < 1 or args.profile_steps < 0:
        parser.error("--warmup and --steps must be >= 1, --profile-steps >= 0")
    if args.worker:
        return
    visible = jax.device_count()
    if args.devices is None:
        args.devices = [n for n in (1, 2, 4, 8) if n <= visible]
    # One process per device on a CPU gives each process its own virtual device.
    limit = None if args.processes == "device" and jax.default_backend() == "cpu" else visible
    if min(args.devices) < 1 or (limit is not None and max(args.devices) > limit):
        parser.error(f"--devices {args.devices}: {visible} devices are visible (on a CPU set "
                     "XLA_FLAGS=--xla_force_host_platform_device_count=8)")  # fmt: skip
    if "fsdp_tensor" in args.layouts and args.tensor < 2:
        parser.error(f"--tensor={args.tensor}: fsdp_tensor needs a tensor axis of size >= 2")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    join_job(argv)
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    platform = jax.default_backend()
    print_header(jax.devices()[0].device_kind, platform)
    rows = []
    # Each row is printed, and the JSON rewritten, as soon as it is measured: a run stopped
    # part-way keeps what it measured (the baselines come first, so efficiencies are known).
    for group in _measure(args, argv):
        rows = with_efficiency(rows + group)
        for r in rows[len(rows) - len(group) :]:
            print_row(r, platform)
        if args.json:
            pathlib.Path(args.json).write_text(
                json.dumps([dataclasses.asdict(r) for r in rows], indent=1)
            )
    if platform == "cpu":
        print("CPU: timings mean nothing, and the trace has no device ops to give comm time.")


def _measure(args, argv):
    """Yields the rows as they are measured: one case at a time in this process, or one device
    count at a time through the launcher."""
    if args.processes == "host":
        for case in plan(args):
            yield [run_case(case, args, jax.devices()[: case.devices])]
    else:
        for n in sorted(set(args.devices) | {1}):
            yield launch(argv, n, jax.default_backend())


if __name__ == "__main__":
    main()
