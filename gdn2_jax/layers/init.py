"""Initializers and the partition-annotated dense layer shared by every module.

Every parameter carries logical axis names ("vocab", "embed", "heads", "mlp", "conv", "kv_heads",
None) so that a training script can map them onto a mesh with `nnx.logical_axis_rules`.
"""

import itertools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import meta

LogicalAxes = tuple[str | None, ...]


def partitioned(init, axes: LogicalAxes):
    """Wraps `init` with logical axis names.

    Sharding is applied eagerly only under a mesh: without one (CPU tests, conversion scripts)
    flax would refuse to create an annotated variable at all.
    """
    return nnx.with_partitioning(init, axes, eager_sharding=meta.global_mesh_defined())


def torch_linear_init(scale: float = 1.0):
    """PyTorch's `nn.Linear` default, U(±1/√fan_in), times `scale`.

    NVIDIA's lit_gpt keeps this default for the attention and MLP projections (`mamba_init`).
    """
    return jax.nn.initializers.variance_scaling(scale**2 / 3.0, "fan_in", "uniform")


def xavier_uniform(gain: float):
    """Xavier-uniform with a gain; the GDN-2 layer uses gain 2^-2.5 (paper D.5)."""
    return jax.nn.initializers.variance_scaling(gain**2, "fan_avg", "uniform")


GDN2_LINEAR_INIT = xavier_uniform(2**-2.5)


def uniform(bound: float):
    """U(−bound, bound)."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def dense(
    in_features: int,
    out_features: int,
    axes: LogicalAxes,
    *,
    init,
    use_bias: bool = False,
    dtype=None,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.Linear:
    """`nnx.Linear` with kernel [in, out] annotated by `axes` (the bias by the output axis)."""
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=partitioned(init, axes),
        bias_init=partitioned(jax.nn.initializers.zeros, (axes[1],)),
        rngs=rngs,
    )


def concat_kernels(linears) -> jax.Array:
    """The kernels of bias-free linears that read one input, side by side on the output axis.

    Decoding concatenates them once, before its loop: `project` then reads the weights in
    one matmul, where XLA's DotMerger would concatenate them anew in every step.
    """
    first = linears[0]
    for lin in linears:
        if lin.bias is not None or lin.in_features != first.in_features:
            raise ValueError("concat_kernels takes bias-free linears of one input width")
        if (lin.dtype, lin.precision) != (first.dtype, first.precision):
            raise ValueError("concat_kernels takes linears of one dtype and precision")
    return jnp.concatenate([lin.kernel[...] for lin in linears], axis=1)


def project(linears, x: jax.Array, kernel: jax.Array | None = None) -> list[jax.Array]:
    """[lin(x) for lin in linears]; with `kernel` (their `concat_kernels`) by one matmul, with
    the dtype promotion and precision of `nnx.Linear`."""
    if kernel is None:
        return [linear(x) for linear in linears]
    first = linears[0]
    x, kernel, _ = first.promote_dtype((x, kernel, None), dtype=first.dtype)
    extra = {}
    if first.preferred_element_type is not None:
        extra["preferred_element_type"] = first.preferred_element_type
    y = first.dot_general(
        x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=first.precision, **extra
    )
    offsets = list(itertools.accumulate(lin.out_features for lin in linears))[:-1]
    return jnp.split(y, offsets, axis=-1)


def conv_bound(kernel_size: int) -> float:
    """PyTorch's depthwise `nn.Conv1d` default bound, 1/√(kernel_size)."""
    return 1.0 / math.sqrt(kernel_size)
