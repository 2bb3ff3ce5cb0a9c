"""The fused decoding step of one GDN-2 layer: all between its projection matmuls in one launch.

One program per (sequence, value head) reads that head's columns of the projections' outputs
and, in registers: shifts the three short-conv histories and applies conv + SiLU to q, k, v;
L2-normalizes q and k; forms g = −exp(A_log) · softplus(f + dt_bias), b = σ(b) (· 2 with negative
eigenvalues allowed) and w = σ(w); applies the delta rule to its float32 state S [K, V] (paper
Eq. 29, as `pallas_kernels.recurrent`); and writes RMSNorm(o) · act(gate). The unfused step
(`GatedDeltaRule2.step` with decode="unfused") takes about ten XLA fusions and the token-serial
kernel for the same work; the order of every float operation follows it, so both give the same
numbers up to the compiler's contraction choices.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.common import F32, compiler_params, dims_unsupported, dtypes_unsupported
from pallas_kernels.config import DEFAULT_DECODE_CONFIG, DecodeConfig

L2NORM_EPS = 1e-6  # fla's l2norm: x · rsqrt(Σx² + 1e-6), as gdn2_jax.ops.l2norm
ACTIVATIONS = ("silu", "sigmoid")


@dataclasses.dataclass(frozen=True)
class DecodeShape:
    """The layer's shapes and the static choices of the step."""

    H: int  # key heads
    HV: int  # value heads (a multiple of H)
    K: int
    V: int
    W: int  # conv size
    scale: float
    b_scale: float  # 2 with negative eigenvalues allowed, else 1
    norm_eps: float
    activation: str  # of the output gate


def _conv(x_ref, hist_ref, weight_ref, hist_out, n, cols, W, dtype):
    """Causal conv + SiLU of one token over the columns `cols`; writes the shifted history."""
    x = x_ref[n, cols]
    acc = jnp.zeros(x.shape, F32)
    for j in range(W - 1):
        tap = hist_ref[n, j, cols]
        acc = acc + tap.astype(dtype).astype(F32) * weight_ref[j, cols].astype(dtype).astype(F32)
        if j > 0:
            hist_out[n, j - 1, cols] = tap
    acc = acc + x.astype(dtype).astype(F32) * weight_ref[W - 1, cols].astype(dtype).astype(F32)
    hist_out[n, W - 2, cols] = x.astype(hist_out.dtype)
    return jax.nn.silu(acc).astype(dtype)


def _l2norm(x):
    xf = x.astype(F32)
    return (xf * jax.lax.rsqrt(jnp.sum(xf * xf) + L2NORM_EPS)).astype(x.dtype)


def _decode_kernel(
    xq_ref, xk_ref, xv_ref, f_ref, b_ref, w_ref, gate_ref,
    hq_ref, hk_ref, hv_ref, wq_ref, wk_ref, wv_ref,
    a_ref, dt_ref, norm_ref, s_ref,
    o_ref, hq_out, hk_out, hv_out, s_out,
    *, shape: DecodeShape, dtype,
):  # fmt: skip
    n, hv = pl.program_id(0), pl.program_id(1)
    h = hv // (shape.HV // shape.H)
    K, V, W = shape.K, shape.V, shape.W
    ks, vs = pl.ds(h * K, K), pl.ds(hv * V, V)
    q = _l2norm(_conv(xq_ref, hq_ref, wq_ref, hq_out, n, ks, W, dtype)).astype(F32)
    k = _l2norm(_conv(xk_ref, hk_ref, wk_ref, hk_out, n, ks, W, dtype)).astype(F32)
    v = _conv(xv_ref, hv_ref, wv_ref, hv_out, n, vs, W, dtype).astype(F32)
    f = f_ref[n, ks].astype(F32) + dt_ref[ks].astype(F32)
    g = -jnp.exp(a_ref[h].astype(F32)) * jax.nn.softplus(f)
    b = (shape.b_scale * jax.nn.sigmoid(b_ref[n, ks].astype(F32))).astype(dtype).astype(F32)
    w = jax.nn.sigmoid(w_ref[n, vs].astype(F32)).astype(dtype).astype(F32)
    S = jnp.exp(g)[:, None] * s_ref[n, hv, :, :]
    erase = jnp.sum((b * k)[:, None] * S, axis=0)
    S = S + k[:, None] * (w * v - erase)[None, :]
    s_out[n, hv, :, :] = S
    o = jnp.sum((q * shape.scale)[:, None] * S, axis=0).astype(dtype).astype(F32)
    rstd = jax.lax.rsqrt(jnp.sum(o * o) / V + shape.norm_eps)
    gate = gate_ref[n, vs].astype(F32)
    act = jax.nn.silu(gate) if shape.activation == "silu" else jax.nn.sigmoid(gate)
    o_ref[n, vs] = (o * rstd * norm_ref[:].astype(F32) * act).astype(o_ref.dtype)


# One program holds a whole [K, V] float32 state: up to 128 x 128 (64 KiB over its 8 warps).
MAX_STATE = 128 * 128


def decode_unsupported(K, V, dtypes, chunk_size=None):
    """Why the fused step cannot run these inputs (None when it can)."""
    del chunk_size  # one token: no chunks
    if K * V > MAX_STATE:
        return f"it holds a whole [K, V] state per program: K·V <= {MAX_STATE}, got {K}·{V}"
    return dims_unsupported(K, V) or dtypes_unsupported(dtypes)


def fused_decode_step(
    x, conv_states, conv_weights, A_log, dt_bias, norm_weight, S,
    *, shape: DecodeShape, cfg: DecodeConfig = DEFAULT_DECODE_CONFIG, interpret: bool = False,
):  # fmt: skip
    """One token of one GDN-2 layer between its projections.

    x: the projections' outputs (q, k [B, H·K]; v [B, HV·V]; f [B, H·K] before dt_bias;
    b [B, H·K]; w [B, HV·V]; gate [B, HV·V]), one dtype, the step's compute dtype.
    conv_states: (q, k, v) histories [B, W−1, ·]; conv_weights: (q, k, v) [W, ·]; A_log [H];
    dt_bias [H·K]; norm_weight [V]; S [B, HV, K, V] float32 (updated in place).
    Returns (o [B, HV·V] in x's dtype: RMSNorm(o) · act(gate)), the new conv histories and S.
    """
    xq, xv = x[0], x[2]
    B, dtype = xq.shape[0], xq.dtype
    reason = decode_unsupported(shape.K, shape.V, tuple(t.dtype for t in x))
    if reason is not None:
        raise NotImplementedError(reason)
    if shape.activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {shape.activation!r}")
    if shape.W < 2:
        raise ValueError(f"the fused step needs a conv size >= 2, got {shape.W}")
    if S.shape != (B, shape.HV, shape.K, shape.V):
        raise ValueError(f"S must be {(B, shape.HV, shape.K, shape.V)}, got {S.shape}")
    kernel = functools.partial(_decode_kernel, shape=shape, dtype=dtype)
    states = [jax.ShapeDtypeStruct(c.shape, c.dtype) for c in conv_states]
    inputs = (*x, *conv_states, *conv_weights, A_log, dt_bias, norm_weight, S.astype(F32))
    o, hq, hk, hv, S_new = pl.pallas_call(
        kernel,
        out_shape=[
            jax.ShapeDtypeStruct(xv.shape, dtype),
            *states,
            jax.ShapeDtypeStruct(S.shape, F32),
        ],
        grid=(B, shape.HV),
        input_output_aliases={len(inputs) - 1: 4},
        compiler_params=compiler_params(cfg.launch),
        interpret=interpret,
        name="gdn2_fused_decode_step",
    )(*inputs)
    return o, (hq, hk, hv), S_new
