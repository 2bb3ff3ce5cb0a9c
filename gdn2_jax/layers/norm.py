"""RMSNorm and the gated RMSNorm of the GDN-2 output path, both computed in float32."""

import jax
import jax.numpy as jnp
from flax import nnx

from gdn2_jax.layers.init import LogicalAxes, partitioned
from gdn2_jax.options import OUTPUT_GATES


def rms_normalize(x, weight, eps: float):
    """x · rsqrt(mean(x²) + eps) · weight over the last axis, in float32."""
    x32 = x.astype(jnp.float32)
    rstd = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return x32 * rstd * weight.astype(jnp.float32)


class RMSNorm(nnx.Module):
    """Root-mean-square norm with a learned scale named `weight` (as PyTorch checkpoints)."""

    def __init__(
        self,
        features: int,
        *,
        eps: float = 1e-5,
        axes: LogicalAxes = ("embed",),
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        del rngs  # ones-initialized; the argument keeps the uniform module signature
        self.eps = eps
        self.dtype = dtype
        self.weight = nnx.Param(
            partitioned(jax.nn.initializers.ones, axes)(None, (features,), param_dtype)
        )

    def __call__(self, x):
        return rms_normalize(x, self.weight[...], self.eps).astype(self.dtype or x.dtype)


class GatedRMSNorm(nnx.Module):
    """RMSNorm(x) · act(gate): the paper's SiLU output gate, or fla's sigmoid one."""

    def __init__(
        self,
        features: int,
        *,
        eps: float = 1e-5,
        activation: str = "silu",
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if activation not in OUTPUT_GATES:
            raise ValueError(f"output_gate must be one of {OUTPUT_GATES}, got {activation!r}")
        del rngs
        self.eps = eps
        self.activation = activation
        self.dtype = dtype
        self.weight = nnx.Param(
            partitioned(jax.nn.initializers.ones, (None,))(None, (features,), param_dtype)
        )

    def __call__(self, x, gate):
        gate32 = gate.astype(jnp.float32)
        act = jax.nn.silu(gate32) if self.activation == "silu" else jax.nn.sigmoid(gate32)
        y = rms_normalize(x, self.weight[...], self.eps) * act
        return y.astype(self.dtype or x.dtype)
