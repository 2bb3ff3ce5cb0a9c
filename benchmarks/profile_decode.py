"""Where one decoding step's time goes: every launch of `Generator`'s compiled decode loop, read
from a `jax.profiler` trace of it (with `--prefill`, of its prefill of the prompt instead).

    python benchmarks/profile_decode.py --preset gdn2-1.3b --batch 1 --steps 16 --json /tmp/p.json
    python benchmarks/profile_decode.py --preset gdn2-1.3b --batch 1 --prompt-len 2048 --prefill
    python benchmarks/profile_decode.py --preset tiny --batch 2 --steps 4   # CPU: the ops it runs

The model (bfloat16, random init) prefills a `--prompt-len` prompt, then its decode loop of
`--steps` tokens is compiled, run once to warm up, and run once under the profiler. On a GPU the
launches are the kernels of the device's streams; elsewhere they are the host's XLA ops. Printed
per decoding step: launches, their summed time, the loop's span from the first launch's start to
the last one's end and the idle rest of it (launch gaps, host waits; on a CPU, whose ops overlap
across threads, it means nothing), then the launches grouped
by name (digits dropped, so `fusion.12` and `fusion.40` are one row), the costliest first.
With `--prefill` the same, per prefill (the prompt's forward and its first sample).
"""

import argparse
import collections
import dataclasses
import glob
import json
import os
import re
import tempfile

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
from bench_generate import model_config
from flax import nnx

from gdn2_jax.generate import MIN_DECODE_ROWS, Generator
from gdn2_jax.model import CausalLM


@dataclasses.dataclass(frozen=True)
class Launch:
    name: str
    start_ns: float
    duration_ns: float


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    on_gpu = jax.default_backend() == "gpu"
    parser.add_argument("--preset", default="gdn2-1.3b" if on_gpu else "tiny")
    parser.add_argument("--variant", default="", help="comma-separated ModelConfig overrides")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=16, help="decoding steps profiled")
    parser.add_argument(
        "--min-decode-rows",
        type=int,
        default=MIN_DECODE_ROWS,
        help="Generator(min_decode_rows=...)",
    )
    parser.add_argument("--merge-dots", action="store_true", help="Generator(merge_dots=True)")
    parser.add_argument(
        "--separate-projections",
        action="store_true",
        help="Generator(concat_projections=False)",
    )
    parser.add_argument(
        "--prefill", action="store_true", help="profile the prefill program, not the decode loop"
    )
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--top", type=int, default=25, help="rows of the grouped table")
    parser.add_argument("--json", help="also write the summary to this file")
    args = parser.parse_args(argv)
    if min(args.batch, args.prompt_len, args.steps, args.top, args.min_decode_rows) < 1:
        parser.error("--batch, --prompt-len, --steps, --top, --min-decode-rows must be >= 1")
    return args


CONTROL_FLOW = re.compile(r"(while|conditional|call)\b")


def _stat(event, key: str):
    return next((v for k, v in event.stats if k == key), None)


def launches(xplane_path: str, module_prefix: str) -> list[Launch]:
    """The launches of the XLA modules whose name starts with `module_prefix`: GPU kernels on
    the device planes' stream lines when there are any, else the host's XLA op events."""
    profile = jax.profiler.ProfileData.from_file(xplane_path)
    planes = [p for p in profile.planes if p.name.startswith("/device:GPU")]
    on_device = bool(planes)
    if not on_device:
        planes = [p for p in profile.planes if p.name.startswith("/host:CPU")]
    out = []
    for plane in planes:
        for line in plane.lines:
            if on_device and not line.name.startswith("Stream"):
                continue  # the derived "XLA Ops" / "XLA Modules" lines repeat the kernels
            for event in line.events:
                module = _stat(event, "hlo_module")
                if module is None or not str(module).startswith(module_prefix):
                    continue
                # On the host a loop's or call's event spans the ops it runs: count those.
                if not on_device and (
                    _stat(event, "hlo_op") is None or CONTROL_FLOW.match(event.name)
                ):
                    continue
                out.append(Launch(event.name, event.start_ns, event.duration_ns))
    if not out:
        seen = {p.name: sorted({ln.name for ln in p.lines}) for p in profile.planes}
        raise RuntimeError(f"no launch of a {module_prefix}* module in the trace; it holds {seen}")
    return sorted(out, key=lambda e: e.start_ns)


def summarize(events: list[Launch], steps: int, top: int) -> dict:
    """Totals and name groups of the launches, per step (per call of the program if 1)."""
    busy = sum(e.duration_ns for e in events)
    span = max(e.start_ns + e.duration_ns for e in events) - events[0].start_ns
    groups = collections.defaultdict(lambda: [0, 0.0])
    for e in events:
        group = groups[re.sub(r"[._]?\d+", "", e.name)]
        group[0] += 1
        group[1] += e.duration_ns
    rows = sorted(groups.items(), key=lambda kv: -kv[1][1])[:top]
    return {
        "launches_per_step": len(events) / steps,
        "busy_us_per_step": busy / steps / 1e3,
        "span_us_per_step": span / steps / 1e3,
        "idle_us_per_step": (span - busy) / steps / 1e3,
        "groups": [
            {"name": name, "per_step": n / steps, "us_per_step": ns / steps / 1e3}
            for name, (n, ns) in rows
        ],
    }


def profile(args) -> dict:
    cfg = model_config(args.preset, args.dtype, args.variant)
    model = CausalLM(cfg, rngs=nnx.Rngs(0))
    gen = Generator(
        model, min_decode_rows=args.min_decode_rows, merge_dots=args.merge_dots,
        concat_projections=not args.separate_projections,
    )  # fmt: skip
    B, T = args.batch, args.prompt_len
    prompt = jax.random.randint(jax.random.key(1), (B, T), 0, cfg.vocab_size)
    lengths, eos = jnp.full((B,), T, jnp.int32), jnp.full((B,), -1, jnp.int32)
    keys = jax.random.split(jax.random.key(0), args.steps + 1)

    def prefill():
        return gen.prefill_fn(
            gen.state, prompt, lengths, eos, keys[0],
            max_len=T + args.steps + 1, sampling=gen.sampling, rows=gen.rows(prompt),
        )  # fmt: skip

    carry = prefill()

    def decode():
        return gen.decode_fn(
            gen.state, carry, keys[1:], eos, jnp.int32(0), sampling=gen.sampling,
            min_rows=gen.min_decode_rows,
        )  # fmt: skip

    # jax names a jitted function's module "jit_" + its name.
    run, module, per = (prefill, "jit__stream_start", 1) if args.prefill else (
        decode, "jit__stream_decode", args.steps
    )  # fmt: skip
    jax.block_until_ready(run())  # compile
    jax.block_until_ready(run())  # warm
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            jax.block_until_ready(run())
        (path,) = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
        events = launches(path, module)
    summary = summarize(events, per, args.top)
    device = jax.devices()[0].device_kind
    unit = "prefill" if args.prefill else "decoding step"
    return {
        "preset": args.preset, "variant": args.variant, "batch": B, "device": device,
        "unit": unit, "prompt_len": T,
    } | summary  # fmt: skip


def print_summary(s: dict) -> None:
    print(f"{s['device']}: {s['preset']} {s['variant'] or 'defaults'}, batch {s['batch']}")
    print(
        f"per {s['unit']}: {s['launches_per_step']:.0f} launches, {s['busy_us_per_step']:.1f} us "
        f"in them, span {s['span_us_per_step']:.1f} us, idle {s['idle_us_per_step']:.1f} us"
    )
    print(f"{'launch':60s} {'per step':>8s} {'us/step':>9s}")
    for g in s["groups"]:
        print(f"{g['name'][:60]:60s} {g['per_step']:8.1f} {g['us_per_step']:9.1f}")


def main(argv=None):
    args = parse_args(argv)
    summary = profile(args)
    print_summary(summary)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
