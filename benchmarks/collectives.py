"""Communication time of a jitted step, read from a `jax.profiler` trace.

The trace's device planes ("/device:GPU:0", ...) hold one event per kernel (or per XLA op on a
derived "XLA Ops" line); an event is communication when its name or its `hlo_op` stat names a
collective (all-reduce, all-gather, reduce-scatter, collective-permute, all-to-all, their async
-start/-done halves) or when it is an NCCL kernel. Their durations are summed per device: the
sum counts overlapped communication in full, so it can exceed what the step loses to it. A CPU
trace has no device planes (XLA:CPU runs collectives inside host threads, without per-op
events), so there is no number to give there.
"""

import contextlib
import pathlib
import re
import tempfile

import jax
from jax.profiler import ProfileData

COLLECTIVE = re.compile(r"all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all|nccl",
                        re.IGNORECASE)  # fmt: skip
DEVICE_PLANE = "/device:"
# xprof's op-level line; where a trace has it, the per-stream kernel lines repeat its events.
OPS_LINE = "XLA Ops"
# The tracer's per-stream kernel lines ("Stream #13(...)").
STREAM_LINE = "Stream"


def _is_collective(event) -> bool:
    if COLLECTIVE.search(event.name):
        return True
    return any(name == "hlo_op" and COLLECTIVE.search(str(value)) for name, value in event.stats)


def _device_lines(plane):
    """The "XLA Ops" line where there is one, else the per-stream kernel lines."""
    lines = [line for line in plane.lines if any(True for _ in line.events)]
    ops = [line for line in lines if line.name == OPS_LINE]
    streams = [line for line in lines if line.name.startswith(STREAM_LINE)]
    if lines and not ops and not streams:
        raise ValueError(
            f"device plane {plane.name!r} has events but neither an {OPS_LINE!r} line nor "
            f"{STREAM_LINE!r} lines: {[line.name for line in lines]}"
        )
    return ops or streams


def communication_ns(profile: ProfileData) -> dict[str, float]:
    """Summed collective durations (ns) per device plane that has events; empty when the trace
    has none (a CPU)."""
    totals = {}
    for plane in profile.planes:
        lines = _device_lines(plane) if plane.name.startswith(DEVICE_PLANE) else []
        if not lines:
            continue
        totals[plane.name] = sum(
            event.duration_ns for line in lines for event in line.events if _is_collective(event)
        )
    return totals


def load_trace(logdir: str | pathlib.Path) -> ProfileData:
    """The one xplane file `jax.profiler.trace(logdir)` wrote."""
    files = sorted(pathlib.Path(logdir).rglob("*.xplane.pb"))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one *.xplane.pb under {logdir}, found {files}")
    return ProfileData.from_file(str(files[0]))


@contextlib.contextmanager
def traced():
    """Traces the block with `jax.profiler`; yields a list that holds the ProfileData after."""
    result = []
    with tempfile.TemporaryDirectory(prefix="gdn2-trace-") as logdir:
        with jax.profiler.trace(logdir):
            yield result
        result.append(load_trace(logdir))


def communication_ms_per_step(run_steps, num_steps: int) -> float | None:
    """Mean over this process's devices of the collective time (ms) per step, over `num_steps`
    steps run by `run_steps()` (which waits for them) inside a trace; None without device
    planes (a CPU)."""
    with traced() as trace:
        run_steps()
    per_device = communication_ns(trace[0])
    if not per_device:
        return None
    return sum(per_device.values()) / len(per_device) / num_steps / 1e6
