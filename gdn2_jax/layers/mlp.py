"""SwiGLU feed-forward block, named as lit_gpt's `mlp.swiglu` (w1 gate, w2 up, w3 down)."""

import jax
import jax.numpy as jnp
from flax import nnx

from gdn2_jax.layers.init import concat_kernels, dense, project, torch_linear_init


class SwiGLU(nnx.Module):
    """x -> w3(SiLU(w1 x) ⊙ w2 x)."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        *,
        out_scale: float = 1.0,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if intermediate_size < 1:
            raise ValueError(f"intermediate_size must be >= 1, got {intermediate_size}")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.w1 = dense(
            hidden_size, intermediate_size, ("embed", "mlp"), init=torch_linear_init(), **kw
        )
        self.w2 = dense(
            hidden_size, intermediate_size, ("embed", "mlp"), init=torch_linear_init(), **kw
        )
        self.w3 = dense(
            intermediate_size,
            hidden_size,
            ("mlp", "embed"),
            init=torch_linear_init(out_scale),
            **kw,
        )

    def step_kernel(self) -> jax.Array:
        """w1 and w2's kernels side by side, made once before a decoding loop for `kernel=`."""
        return concat_kernels((self.w1, self.w2))

    def __call__(self, x, *, kernel=None):
        """`kernel`: `step_kernel()`, to read w1 and w2 in one matmul (the same numbers)."""
        gate, up = project((self.w1, self.w2), x, kernel)
        return self.w3(jax.nn.silu(gate) * up)
