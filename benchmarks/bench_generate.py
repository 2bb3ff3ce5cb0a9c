"""Generation speed of the 1.3B models: prefill, per-token decode and the overhead of `generate`,
with fla's token-serial GDN-2 layer step in PyTorch beside ours, per layer.

    python benchmarks/bench_generate.py                 # GPU: both 1.3B presets, batch 1, 8, 64
    python benchmarks/bench_generate.py --presets gdn2-1.3b --batches 1 --variants "" \\
        gdn2_decode=fused --json /tmp/generate.json

Weights and compute in bfloat16 (`--dtype`), random init, random prompts of `--prompt-len`
tokens and `--new-tokens` new ones, greedy. Per row, from one `gdn2_jax.generate.Generator`:
`prefill ms` (its compiled prefill of the prompt and first sample, `rows` prompt rows at a time
as `--prefill-tokens` allows), `decode ms/tok` (its
compiled decode loop over the other new tokens, divided by their number), `generate ms`
(`Generator.generate` end to end) and `overhead ms` = generate − prefill − (N − 1) · decode;
`generate() ms` is the module-level `generate`, which splits the model's graph on every call.
Times are medians of `--repeats` after a compile and a warm-up call; `min` is the generator's
`min_decode_rows` (`--min-decode-rows`), `mrg` its `merge_dots` (`--merge-dots`), `cat` its
`concat_projections` (`--concat-projections`). A variant is a
comma-separated list of `ModelConfig` overrides ("" for the defaults).

The per-layer table times one token of one GDN-2 layer of the preset's shapes at each batch:
ours (`GatedDeltaRule2.step`, the whole layer, with decode="unfused" and "fused", and
`gated_delta_rule2_step`, the op) as a jitted loop of `--layer-steps` steps, and fla's
`GatedDeltaNet2` layer (with its cache) and `fused_recurrent_gdn2` op, eager, between CUDA
events. On a CPU it runs the tiny preset at batch 2 without fla, so CI can execute it.
"""

import argparse
import dataclasses
import itertools
import json
import os
import statistics
import time

# JAX and torch share the GPU in one process: JAX must not take 75% of it up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
from flax import nnx

from gdn2_jax.config import apply_overrides
from gdn2_jax.generate import MIN_DECODE_ROWS, PREFILL_TOKENS, Generator, generate
from gdn2_jax.layers import GatedDeltaRule2
from gdn2_jax.model import CausalLM
from gdn2_jax.model_config import ModelConfig
from gdn2_jax.ops import gated_delta_rule2_step


@dataclasses.dataclass(frozen=True)
class Row:
    preset: str
    variant: str
    batch: int
    min_decode_rows: int
    merge_dots: bool
    concat_projections: bool
    prompt_len: int
    new_tokens: int
    prefill_rows: int
    prefill_ms: float
    decode_ms_per_token: float
    generate_ms: float
    overhead_ms: float
    generate_fn_ms: float
    decode_tokens_per_s: float
    tokens_per_s: float
    setup_s: float


@dataclasses.dataclass(frozen=True)
class LayerRow:
    batch: int
    impl: str
    step_us: float | None
    note: str = ""


def parse_args(argv=None):
    on_gpu = jax.default_backend() == "gpu"
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument(
        "--presets", nargs="+", default=["gdn2-1.3b", "hybrid-1.3b"] if on_gpu else ["tiny"]
    )
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64] if on_gpu else [2])
    parser.add_argument("--prompt-len", type=int, default=2048 if on_gpu else 16)
    parser.add_argument("--new-tokens", type=int, default=256 if on_gpu else 8)
    parser.add_argument("--variants", nargs="+", default=[""], help="ModelConfig overrides")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument(
        "--prefill-tokens", type=int, default=PREFILL_TOKENS,
        help="Generator(prefill_tokens=...): prompt tokens prefilled at once; 0 for all rows",
    )  # fmt: skip
    parser.add_argument(
        "--min-decode-rows", nargs="+", type=int, default=[MIN_DECODE_ROWS],
        help="Generator(min_decode_rows=...) values, each a row per variant and batch",
    )  # fmt: skip
    parser.add_argument(
        "--merge-dots", nargs="+", choices=("off", "on"), default=["off"],
        help="Generator(merge_dots=...) settings, each a row per variant and batch",
    )  # fmt: skip
    parser.add_argument(
        "--concat-projections", nargs="+", choices=("off", "on"), default=["on"],
        help="Generator(concat_projections=...) settings, each a row per variant and batch",
    )  # fmt: skip
    parser.add_argument(
        "--decode-block-v", nargs="+", type=int, default=[],
        help="also time the fused layer step with each DecodeConfig.block_v",
    )  # fmt: skip
    parser.add_argument(
        "--decode-warps", nargs="+", type=int, default=[],
        help="with each --decode-block-v, also each of these warps per program",
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layer-steps", type=int, default=200 if on_gpu else 4)
    parser.add_argument("--no-fla", action="store_true", help="skip fla's PyTorch layer step")
    parser.add_argument("--no-layers", action="store_true", help="skip the per-layer table")
    parser.add_argument("--json", help="also write both tables to this file")
    args = parser.parse_args(argv)
    if args.new_tokens < 2 or args.prompt_len < 1 or args.repeats < 1 or args.layer_steps < 1:
        parser.error("--new-tokens must be >= 2; --prompt-len, --repeats, --layer-steps >= 1")
    if min(args.batches) < 1 or min(args.min_decode_rows) < 1:
        parser.error("--batches and --min-decode-rows must be >= 1")
    if not on_gpu and not args.no_fla:
        print("no GPU: fla's PyTorch layer step (Triton kernels) is skipped")
        args.no_fla = True
    return args


def model_config(preset: str, dtype: str, variant: str) -> ModelConfig:
    cfg = ModelConfig.preset(preset, dtype=dtype, param_dtype=dtype)
    return apply_overrides(cfg, [kv.strip() for kv in variant.split(",") if kv.strip()])


def _median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@dataclasses.dataclass(frozen=True)
class Settings:
    """The `Generator` arguments a row varies."""

    min_decode_rows: int
    merge_dots: bool
    concat_projections: bool

    def kwargs(self) -> dict:
        return dataclasses.asdict(self)


def time_generate(
    cfg: ModelConfig, batch: int, args, preset: str, variant: str, settings: Settings
) -> Row:
    start = time.perf_counter()
    model = CausalLM(cfg, rngs=nnx.Rngs(0))
    prompt = jax.random.randint(jax.random.key(1), (batch, args.prompt_len), 0, cfg.vocab_size)
    N = args.new_tokens
    gen = Generator(model, prefill_tokens=args.prefill_tokens or None, **settings.kwargs())
    # The Generator's own compiled pieces, called as `Generator.generate` calls them.
    lengths = jnp.full((batch,), args.prompt_len, jnp.int32)
    eos, pad = jnp.full((batch,), -1, jnp.int32), jnp.asarray(0, jnp.int32)
    keys = jax.random.split(jax.random.key(0), N)
    max_len = args.prompt_len + N

    def prefill():
        return gen.prefill_fn(
            gen.state, prompt, lengths, eos, keys[0],
            max_len=max_len, sampling=gen.sampling, rows=gen.rows(prompt),
        )  # fmt: skip

    carry = jax.block_until_ready(prefill())

    def decode():
        return gen.decode_fn(
            gen.state, carry, keys[1:], eos, pad, sampling=gen.sampling,
            min_rows=settings.min_decode_rows,
        )  # fmt: skip

    def whole():
        return gen.generate(prompt, max_new_tokens=N)

    def whole_fn():
        return generate(
            model, prompt, max_new_tokens=N, prefill_tokens=gen.prefill_tokens,
            **settings.kwargs(),
        )  # fmt: skip

    for fn in (decode, whole, whole_fn):
        jax.block_until_ready(fn())  # compile, then one warm call
        jax.block_until_ready(fn())
    setup_s = time.perf_counter() - start
    prefill_s, decode_s = _median_s(prefill, args.repeats), _median_s(decode, args.repeats)
    whole_s, whole_fn_s = _median_s(whole, args.repeats), _median_s(whole_fn, args.repeats)
    step_s = decode_s / (N - 1)
    return Row(
        preset=preset,
        variant=variant or "defaults",
        batch=batch,
        **settings.kwargs(),
        prompt_len=args.prompt_len,
        new_tokens=N,
        prefill_rows=gen.rows(prompt),
        prefill_ms=prefill_s * 1e3,
        decode_ms_per_token=step_s * 1e3,
        generate_ms=whole_s * 1e3,
        overhead_ms=(whole_s - prefill_s - decode_s) * 1e3,
        generate_fn_ms=whole_fn_s * 1e3,
        decode_tokens_per_s=batch / step_s,
        tokens_per_s=batch * N / whole_s,
        setup_s=setup_s,
    )


def _gdn2_layer(
    cfg: ModelConfig, decode: str, block_v: int | None = None, warps: int | None = None
) -> GatedDeltaRule2:
    dtype = jnp.dtype(cfg.dtype)
    return GatedDeltaRule2(
        cfg.hidden_size, cfg.gdn2_num_heads, cfg.gdn2_head_dim,
        expand_v=cfg.gdn2_expand_v, conv_size=cfg.conv_size, output_gate=cfg.output_gate,
        norm_eps=cfg.norm_eps, recurrent_backend=cfg.gdn2_recurrent_backend, decode=decode,
        decode_block_v=block_v, decode_warps=warps, interpret=cfg.gdn2_interpret, dtype=dtype,
        param_dtype=dtype, rngs=nnx.Rngs(0),
    )  # fmt: skip


def _loop_us(step, carry, x, steps: int) -> float:
    """Microseconds per step of a jitted loop of `steps` steps (the state carried along)."""

    @jax.jit
    def loop(carry):
        return jax.lax.fori_loop(0, steps, lambda _, c: step(x, c), carry)

    jax.block_until_ready(loop(carry))
    return _median_s(lambda: loop(carry), 3) / steps * 1e6


def time_layer_steps(
    cfg: ModelConfig, batch: int, steps: int, block_vs: list[int] = (), warps: list[int] = ()
) -> list[LayerRow]:
    """Our whole layer step, unfused and fused (where the fused one runs here; also with each
    of `block_vs` V columns per program, each with the derived warps and each of `warps`)."""
    x = jax.random.normal(jax.random.key(0), (batch, cfg.hidden_size), jnp.dtype(cfg.dtype))
    rows = []
    tiles = [(b, w) for b in block_vs for w in (None, *warps)]
    for decode, (block_v, w) in [("unfused", (None, None)), ("fused", (None, None)),
                                 *(("fused", t) for t in tiles)]:  # fmt: skip
        layer = _gdn2_layer(cfg, decode, block_v, w)
        name = f"ours layer step {decode}" + (f" block_v={block_v}" if block_v else "")
        name += f" warps={w}" if w else ""
        reason = layer.fused_decode_unsupported(layer.dtype) if decode == "fused" else None
        if reason is not None:
            rows.append(LayerRow(batch, name, None, f"not run: {reason}"))
            continue
        graphdef, state = nnx.split(layer)

        def layer_step(x, cache, graphdef=graphdef, state=state):
            return nnx.merge(graphdef, state).step(x, cache)[1]

        us = _loop_us(layer_step, layer.init_cache(batch), x, steps)
        rows.append(LayerRow(batch, name, us))
    return rows


def time_op_step(cfg: ModelConfig, batch: int, steps: int) -> LayerRow:
    """Our token-serial op alone (`gated_delta_rule2_step`)."""
    H, K = cfg.gdn2_num_heads, cfg.gdn2_head_dim
    V = round(K * cfg.gdn2_expand_v)
    keys = jax.random.split(jax.random.key(1), 6)
    dt = jnp.dtype(cfg.dtype)
    q, k = (jax.random.normal(keys[i], (batch, H, K), dt) for i in range(2))
    v = jax.random.normal(keys[2], (batch, H, V), dt)
    g = -jax.random.uniform(keys[3], (batch, H, K))
    b = jax.random.uniform(keys[4], (batch, H, K)).astype(dt)
    w = jax.random.uniform(keys[5], (batch, H, V)).astype(dt)

    def op_step(q, S):
        return gated_delta_rule2_step(q, k, v, g, b, w, S, use_qk_l2norm=True,
                                      backend=cfg.gdn2_recurrent_backend)[1]  # fmt: skip

    S = jnp.zeros((batch, H, K, V), jnp.float32)
    return LayerRow(batch, "ours op step", _loop_us(op_step, S, q, steps))


def time_layers(cfg: ModelConfig, args) -> list[LayerRow]:
    rows = []
    for batch in args.batches:
        rows += [
            *time_layer_steps(cfg, batch, args.layer_steps, args.decode_block_v, args.decode_warps),
            time_op_step(cfg, batch, args.layer_steps),
        ]
        if not args.no_fla:
            import fla_decode_peer  # torch and fla load only when the peer runs

            rows += fla_decode_peer.time_fla_layer(cfg, batch, args.layer_steps)
    return rows


def print_header() -> None:
    print(f"{jax.devices()[0].device_kind}, {jax.default_backend()}")
    print(
        f"{'preset':12s} {'variant':24s} {'B':>3s} {'min':>3s} {'mrg':>3s} {'cat':>3s} "
        f"{'prompt':>6s} "
        f"{'new':>4s} "
        f"{'rows':>4s} "
        f"{'prefill ms':>10s} "
        f"{'decode ms/tok':>13s} {'generate ms':>11s} {'overhead ms':>11s} "
        f"{'generate() ms':>13s} {'decode tok/s':>12s} {'tok/s':>9s}",
        flush=True,
    )


def print_row(r: Row) -> None:
    print(
        f"{r.preset:12s} {r.variant:24s} {r.batch:3d} {r.min_decode_rows:3d} "
        f"{'on' if r.merge_dots else 'off':>3s} {'on' if r.concat_projections else 'off':>3s} "
        f"{r.prompt_len:6d} {r.new_tokens:4d} "
        f"{r.prefill_rows:4d} {r.prefill_ms:10.2f} {r.decode_ms_per_token:13.3f} "
        f"{r.generate_ms:11.1f} {r.overhead_ms:11.2f} {r.generate_fn_ms:13.1f} "
        f"{r.decode_tokens_per_s:12.0f} {r.tokens_per_s:9.0f}",
        flush=True,
    )


def print_layer_rows(rows: list[LayerRow]) -> None:
    print("one GDN-2 layer, one token (the preset's first GDN-2 shapes)")
    print(f"{'B':>3s} {'implementation':44s} {'us/step':>9s}")
    for r in rows:
        us = f"{r.step_us:9.1f}" if r.step_us is not None else f"{'-':>9s}"
        print(f"{r.batch:3d} {r.impl:44s} {us} {r.note}", flush=True)


def write_json(path: str | None, rows: list[Row], layer_rows: list[LayerRow]) -> None:
    if not path:
        return
    with open(path, "w") as f:
        json.dump(
            {
                "device": jax.devices()[0].device_kind,
                "generate": [dataclasses.asdict(r) for r in rows],
                "layer_step": [dataclasses.asdict(r) for r in layer_rows],
            },
            f,
            indent=1,
        )


def main(argv=None):
    args = parse_args(argv)
    rows = []
    print_header()
    # Each row is printed and saved as it finishes, so a run cut short keeps what it measured.
    for preset in args.presets:
        for variant in args.variants:
            cfg = model_config(preset, args.dtype, variant)
            for b in args.batches:
                for min_rows, merge, concat in itertools.product(
                    args.min_decode_rows, args.merge_dots, args.concat_projections
                ):
                    settings = Settings(min_rows, merge == "on", concat == "on")
                    rows.append(time_generate(cfg, b, args, preset, variant, settings))
                    print_row(rows[-1])
                    write_json(args.json, rows, [])
    layer_rows = []
    if not args.no_layers:
        layer_rows = time_layers(model_config(args.presets[0], args.dtype, args.variants[0]), args)
        print_layer_rows(layer_rows)
    write_json(args.json, rows, layer_rows)


if __name__ == "__main__":
    main()
