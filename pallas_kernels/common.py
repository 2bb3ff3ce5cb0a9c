"""Helpers shared by the kernels: dot precision policy, matmuls, iota masks, launch params."""

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.config import SUPPORTED_DIMS, Launch

F32 = jnp.float32
HIGHEST = jax.lax.Precision.HIGHEST
# The state passes take (seq, first, last, initial states, zeros, ...): input 4 is a zero-filled
# buffer of per-sequence states aliased to the output that holds them, so the entries of
# sequences that a program does not end stay zero without a separate fill.
ZEROS_INPUT = 4
# Each operand split into three TF32 parts: float32 accuracy on the tensor cores.
TF32X3 = jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3


@dataclasses.dataclass(frozen=True)
class Numerics:
    """How each class of matmul runs, decided once per call from the input dtype and device.

    mm_dtype:        operand dtype of the state/auxiliary matmuls (the input dtype: bf16 inputs
                     use bf16 tensor-core dots with float32 accumulation, as fla does).
    mm_precision:    precision of those matmuls when mm_dtype is float32.
    score_precision: float32 matmuls of decay-factored tiles (TF32 for 16-bit inputs: their
                     operands carry exp factors that bf16 would round).
    solve_precision: the blocked triangular solve's block merges (`SOLVE_PRECISIONS`, chosen by
                     `ChunkConfig.solve`; float32 by default, paper D.4).
    """

    mm_dtype: jnp.dtype
    mm_precision: object
    score_precision: object
    solve_precision: object
    interpret: bool


# ChunkConfig.solve -> the dot precision of the solve's block merges. "float32" is IEEE float32
# (off the tensor cores under the Triton lowering), "tf32x3" float32-accurate on the tensor cores,
# "tf32" one TF32 pass.
SOLVE_PRECISIONS = {
    "float32": HIGHEST,
    "tf32x3": TF32X3,
    "tf32": jax.lax.Precision.DEFAULT,
}


def numerics_for(dtype, interpret, solve="float32"):
    dtype = jnp.dtype(dtype)
    if interpret:
        # The CPU evaluates every float32 dot exactly; TF32 algorithms do not exist there.
        exact = None if dtype != F32 else HIGHEST
        return Numerics(dtype, exact, HIGHEST, HIGHEST, True)
    solve_precision = SOLVE_PRECISIONS[solve]
    if dtype == F32:
        return Numerics(dtype, TF32X3, TF32X3, solve_precision, False)
    return Numerics(dtype, None, jax.lax.Precision.DEFAULT, solve_precision, False)


def mm(a, b, precision=None, *, ta=False, tb=False):
    """a @ b (aᵀ, bᵀ with ta, tb) with float32 accumulation; both operands one dtype."""
    dims = (((0,) if ta else (1,), (1,) if tb else (0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=F32)


def mm_cast(a, b, num: Numerics, *, ta=False, tb=False):
    """A state/auxiliary matmul: operands cast to the numerics' matmul dtype."""
    dt = num.mm_dtype
    return mm(a.astype(dt), b.astype(dt), num.mm_precision, ta=ta, tb=tb)


def iota(shape, dim):
    return jax.lax.broadcasted_iota(jnp.int32, shape, dim)


def compiler_params(launch: Launch):
    return pltriton.CompilerParams(num_warps=launch.num_warps, num_stages=launch.num_stages)


def barrier(num: Numerics):
    """Orders this program's global stores before its later loads of the same data (GPU only:
    interpret mode runs a program's statements in order)."""
    if not num.interpret:
        pltriton.debug_barrier()


def dims_unsupported(K, V):
    """Why the kernels cannot run head sizes K, V (None when they can)."""
    for name, d in (("K", K), ("V", V)):
        if d not in SUPPORTED_DIMS:
            return (
                f"pallas kernels support {name} in {SUPPORTED_DIMS} (powers of two >= 16 for "
                f"Triton dots, <= 256 so a state tile fits in registers), got {name}={d}"
            )
    return None


def dtypes_unsupported(dtypes):
    """Why the kernels cannot run inputs of `dtypes` (None when they can)."""
    wide = [str(d) for d in dtypes if jnp.dtype(d).itemsize > 4]
    if wide:
        return f"pallas kernels run float32 and 16-bit floats, got {', '.join(wide)}"
    return None


def row(x, r):
    """Row r of a 2-D register value as a 1-D vector (values cannot be sliced in Triton)."""
    return jnp.sum(jnp.where(iota(x.shape, 0) == r, x, 0.0), axis=0)
