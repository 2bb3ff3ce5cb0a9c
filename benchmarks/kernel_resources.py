"""Registers, spills and shared memory of every Pallas kernel of the chunk op, on any machine.

    python benchmarks/kernel_resources.py                          # default config, fwd + bwd
    python benchmarks/kernel_resources.py --heads 16x256x256       # the largest heads
    python benchmarks/kernel_resources.py --configs structure=split_prep,diag_inverse=doubling \\
        structure=split_prep,diag_blocks=levels,diag=4:1 --forward

The op (bf16, H = 16, K = V = 128 by default; `--configs` as bench_ops takes them) is lowered
for an H100 (an abstract device: no GPU needed) and each Pallas launch's Triton module is
compiled by the `triton` package for sm_90 (ptxas included), whose cubin reports registers per
thread, local memory per thread (spills) and shared memory. XLA compiles the same modules with
its own Triton, so the counts can differ slightly from what runs; they agreed on the forward
diagonal launch (255 registers here and under Nsight Compute on an H100). `blocks/SM` is how
many programs of that launch fit an SM's 64K registers, and `occ %` the warps they hold out of
64: a register-bound launch shows a low ceiling here before any GPU time is spent.
"""

import argparse
import dataclasses
import os
import re
import subprocess
import tempfile

import jax
import jax.numpy as jnp
from bench_ops import parse_config
from jax._src import mesh as mesh_lib
from jax._src.lib.mlir import ir

from gdn2_jax.ops.layout import dense_segments
from pallas_kernels import default_chunk_config, pallas_chunk_core
from pallas_kernels.config import CHUNK

DEVICE_KIND = "NVIDIA H100 80GB HBM3"
SHARED_PER_SM = 232_448  # bytes a program may ask for on Hopper (227 KB)
TRITON_TARGET = "xla.gpu.triton"
REGISTERS_PER_SM, MAX_WARPS_PER_SM, MAX_BLOCKS_PER_SM = 65536, 64, 32


@dataclasses.dataclass(frozen=True)
class Kernel:
    name: str
    ttir: bytes  # MLIR bytecode of the Triton module
    num_warps: int
    num_stages: int


def _custom_calls(op):
    for region in op.regions:
        for block in region.blocks:
            for child in block.operations:
                if child.operation.name == "stablehlo.custom_call":
                    yield child.operation
                yield from _custom_calls(child.operation)


def triton_kernels(fn, *args) -> list[Kernel]:
    """The Pallas (Triton) launches of fn(*args), lowered for an H100 without one."""
    device = mesh_lib.AbstractDevice(device_kind=DEVICE_KIND, num_cores=None, platform="cuda")
    mesh = mesh_lib.AbstractMesh((1,), ("x",), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    kernels = []
    for call in _custom_calls(lowered.compiler_ir("stablehlo").operation):
        if TRITON_TARGET not in str(call.attributes["call_target_name"]):
            continue
        config = ir.DictAttr(call.attributes["mhlo.backend_config"])
        kernels.append(
            Kernel(
                name=ir.StringAttr(config["name"]).value,
                ttir=ir.StringAttr(config["ir"]).value_bytes,
                num_warps=ir.IntegerAttr(config["num_warps"]).value,
                num_stages=ir.IntegerAttr(config["num_stages"]).value,
            )
        )
    return kernels


def resources(kernel: Kernel, workdir: str) -> dict[str, int]:
    """REG, LOCAL and STACK (spills, bytes per thread) of the kernel compiled for sm_90, and
    SHARED: the shared memory a program asks for at launch (the pipeline stages' buffers and
    layout conversions included), bytes."""
    import triton
    from triton._C.libtriton import ir as triton_ir
    from triton.backends.compiler import GPUTarget

    context = triton_ir.context()
    triton_ir.load_dialects(context)
    bytecode = os.path.join(workdir, f"{kernel.name}.mlirbc")
    with open(bytecode, "wb") as f:
        f.write(kernel.ttir)
    text = os.path.join(workdir, f"{kernel.name}.ttir")  # triton.compile reads text IR
    with open(text, "w") as f:
        f.write(str(triton_ir.parse_mlir_module(bytecode, context)))
    options = {"num_warps": kernel.num_warps, "num_stages": kernel.num_stages}
    compiled = triton.compile(text, target=GPUTarget("cuda", 90, 32), options=options)
    cubin = os.path.join(workdir, f"{kernel.name}.cubin")
    with open(cubin, "wb") as f:
        f.write(compiled.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    usage = subprocess.run(
        [tool, "--dump-resource-usage", cubin], capture_output=True, text=True, check=True
    ).stdout
    found = {k: int(v) for k, v in re.findall(r"\b(REG|LOCAL|STACK):(\d+)", usage)}
    return {**found, "SHARED": compiled.metadata.shared}


def occupancy(regs: int, warps: int) -> tuple[int, float]:
    """Programs per SM that its registers allow (256-register allocation units per warp) and
    the share of the SM's warps they hold."""
    per_warp = -(-regs * 32 // 256) * 256
    blocks = min(MAX_BLOCKS_PER_SM, REGISTERS_PER_SM // (per_warp * warps))
    return blocks, 100.0 * min(MAX_WARPS_PER_SM, blocks * warps) / MAX_WARPS_PER_SM


def op_kernels(overrides: dict, B: int, T: int, H: int, K: int, V: int, forward: bool):
    """The launches of the Pallas chunk core under the bf16 config with `overrides`."""
    cfg = dataclasses.replace(default_chunk_config(jnp.bfloat16), **overrides)
    bf16 = jnp.bfloat16
    shapes = {"q": K, "k": K, "v": V, "g": K, "b": K, "w": V}
    args = [
        jax.ShapeDtypeStruct((B, T, H, d), jnp.float32 if n == "g" else bf16)
        for n, d in shapes.items()
    ]
    h0s = jnp.zeros((2, B, H, K, V), jnp.float32)
    segments = dense_segments(T // CHUNK)

    def core(*a):
        return pallas_chunk_core(*a, h0s, segments, K**-0.5, CHUNK, cfg, False)[0]

    if forward:
        return triton_kernels(core, *args)

    def loss(*a):
        return jnp.sum(core(*a).astype(jnp.float32))

    return triton_kernels(jax.grad(loss, argnums=tuple(range(6))), *args)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--configs", nargs="*", default=[""], help="bench_ops-style overrides")
    parser.add_argument("--shape", default="1x256", help="B x T (registers do not depend on it)")
    parser.add_argument("--heads", default="16x128x128", help="H x K x V")
    parser.add_argument("--forward", action="store_true", help="the forward's launches only")
    args = parser.parse_args(argv)
    B, T = map(int, args.shape.split("x"))
    H, K, V = map(int, args.heads.split("x"))
    print(f"{'config':52s} {'kernel':34s} {'warps':>5s} {'stages':>6s} {'regs':>4s} "
          f"{'spill B':>7s} {'shared B':>8s} {'blocks/SM':>9s} {'occ %':>5s}")  # fmt: skip
    with tempfile.TemporaryDirectory() as workdir:
        for text in args.configs:
            for kernel in op_kernels(parse_config(text), B, T, H, K, V, args.forward):
                r = resources(kernel, workdir)
                blocks, occ = occupancy(r["REG"], kernel.num_warps)
                spill = r.get("LOCAL", 0) + r.get("STACK", 0)
                print(
                    f"{text or 'default':52s} {kernel.name:34s} {kernel.num_warps:5d} "
                    f"{kernel.num_stages:6d} {r['REG']:4d} {spill:7d} "
                    f"{r['SHARED']:8d} {blocks:9d} {occ:5.1f}"
                    + ("  over the shared memory" if r["SHARED"] > SHARED_PER_SM else ""),
                    flush=True,
                )


if __name__ == "__main__":
    main()
