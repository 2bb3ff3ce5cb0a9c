"""The fused decoding step of one GDN-2 layer: all between its projection matmuls in one launch.

One program per (sequence, value head, block of V columns) reads that head's columns of the
projections' outputs and, in registers: shifts the three short-conv histories and applies
conv + SiLU to q, k, v; L2-normalizes q and k; forms g = −exp(A_log) · softplus(f + dt_bias),
b = σ(b) (· 2 with negative eigenvalues allowed) and w = σ(w); applies the delta rule (paper
Eq. 29, as `pallas_kernels.recurrent`) to its [K, block_v] tile of the float32 state S; and
writes RMSNorm(o) · act(gate) (the norm in XLA when a head's V columns span programs: more
programs hide the state's memory latency better at large batch). The unfused step
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


@dataclasses.dataclass(frozen=True)
class _History:
    """A short conv's W−1 past inputs: read from `ref`, written shifted to `out` if `write`."""

    ref: object
    out: object
    write: object  # a traced bool

    def store(self, n, j, cols, value):
        @pl.when(self.write)
        def _():
            self.out[n, j, cols] = value.astype(self.out.dtype)


def _conv(x_ref, hist: _History, weight_ref, n, cols, W, dtype):
    """Causal conv + SiLU of one token over the columns `cols`; stores the shifted history."""
    x = x_ref[n, cols]
    acc = jnp.zeros(x.shape, F32)
    for j in range(W - 1):
        tap = hist.ref[n, j, cols]
        acc = acc + tap.astype(dtype).astype(F32) * weight_ref[j, cols].astype(dtype).astype(F32)
        if j > 0:
            hist.store(n, j - 1, cols, tap)
    acc = acc + x.astype(dtype).astype(F32) * weight_ref[W - 1, cols].astype(dtype).astype(F32)
    hist.store(n, W - 2, cols, x)
    return jax.nn.silu(acc).astype(dtype)


def _l2norm(x):
    xf = x.astype(F32)
    return (xf * jax.lax.rsqrt(jnp.sum(xf * xf) + L2NORM_EPS)).astype(x.dtype)


def _gated_rmsnorm(o, gate, norm_weight, shape: DecodeShape):
    """RMSNorm over a head's V columns, times the output gate's activation; o rounded to the
    step's dtype first, as the unfused step's op output is."""
    o = o.astype(F32)
    rstd = jax.lax.rsqrt(jnp.sum(o * o, axis=-1, keepdims=True) / shape.V + shape.norm_eps)
    gate = gate.astype(F32)
    act = jax.nn.silu(gate) if shape.activation == "silu" else jax.nn.sigmoid(gate)
    return o * rstd * norm_weight.astype(F32) * act


def _decode_kernel(
    xq_ref, xk_ref, xv_ref, f_ref, b_ref, w_ref, gate_ref,
    hq_ref, hk_ref, hv_ref, wq_ref, wk_ref, wv_ref,
    a_ref, dt_ref, norm_ref, s_ref,
    o_ref, hq_out, hk_out, hv_out, s_out,
    *, shape: DecodeShape, BV: int, dtype,
):  # fmt: skip
    n, hv, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    h = hv // (shape.HV // shape.H)
    K, V, W = shape.K, shape.V, shape.W
    ks, vs, cols = pl.ds(h * K, K), pl.ds(hv * V + j * BV, BV), pl.ds(j * BV, BV)
    # Every V tile of a head needs its whole q and k; the first one writes their histories.
    q_hist, k_hist = _History(hq_ref, hq_out, j == 0), _History(hk_ref, hk_out, j == 0)
    q = _l2norm(_conv(xq_ref, q_hist, wq_ref, n, ks, W, dtype)).astype(F32)
    k = _l2norm(_conv(xk_ref, k_hist, wk_ref, n, ks, W, dtype)).astype(F32)
    v = _conv(xv_ref, _History(hv_ref, hv_out, True), wv_ref, n, vs, W, dtype).astype(F32)
    f = f_ref[n, ks].astype(F32) + dt_ref[ks].astype(F32)
    g = -jnp.exp(a_ref[h].astype(F32)) * jax.nn.softplus(f)
    b = (shape.b_scale * jax.nn.sigmoid(b_ref[n, ks].astype(F32))).astype(dtype).astype(F32)
    w = jax.nn.sigmoid(w_ref[n, vs].astype(F32)).astype(dtype).astype(F32)
    S = jnp.exp(g)[:, None] * s_ref[n, hv, :, cols]
    erase = jnp.sum((b * k)[:, None] * S, axis=0)
    S = S + k[:, None] * (w * v - erase)[None, :]
    s_out[n, hv, :, cols] = S
    o = jnp.sum((q * shape.scale)[:, None] * S, axis=0).astype(dtype)
    if BV < V:  # the norm spans V tiles: `fused_decode_step` applies it
        o_ref[n, vs] = o.astype(o_ref.dtype)
        return
    o_ref[n, vs] = _gated_rmsnorm(o, gate_ref[n, vs], norm_ref[:], shape).astype(o_ref.dtype)


# A program holds a [K, block_v] float32 state tile: up to 128 x 128 (64 KiB over 8 warps).
MAX_STATE = 128 * 128


def _state_unsupported(K, V, cfg: DecodeConfig):
    if K * cfg.tile_v(V) > MAX_STATE:
        return (
            f"a program holds a [K, block_v] state tile: K·block_v <= {MAX_STATE}, got "
            f"{K}·{cfg.tile_v(V)} (DecodeConfig.block_v={cfg.block_v})"
        )
    return None


def decode_unsupported(K, V, dtypes, chunk_size=None, cfg: DecodeConfig = DEFAULT_DECODE_CONFIG):
    """Why the fused step cannot run these inputs (None when it can)."""
    del chunk_size  # one token: no chunks
    return dims_unsupported(K, V) or _state_unsupported(K, V, cfg) or dtypes_unsupported(dtypes)


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
    With `cfg.block_v` < V the kernel writes o and the norm follows in XLA (same operations).
    """
    xq, xv = x[0], x[2]
    B, dtype = xq.shape[0], xq.dtype
    reason = decode_unsupported(shape.K, shape.V, tuple(t.dtype for t in x), cfg=cfg)
    if reason is not None:
        raise NotImplementedError(reason)
    cfg.check_dims(shape.K, shape.V)
    if shape.activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {shape.activation!r}")
    if shape.W < 2:
        raise ValueError(f"the fused step needs a conv size >= 2, got {shape.W}")
    if S.shape != (B, shape.HV, shape.K, shape.V):
        raise ValueError(f"S must be {(B, shape.HV, shape.K, shape.V)}, got {S.shape}")
    BV = cfg.tile_v(shape.V)
    kernel = functools.partial(_decode_kernel, shape=shape, BV=BV, dtype=dtype)
    states = [jax.ShapeDtypeStruct(c.shape, c.dtype) for c in conv_states]
    inputs = (*x, *conv_states, *conv_weights, A_log, dt_bias, norm_weight, S.astype(F32))
    o, hq, hk, hv, S_new = pl.pallas_call(
        kernel,
        out_shape=[
            jax.ShapeDtypeStruct(xv.shape, dtype),
            *states,
            jax.ShapeDtypeStruct(S.shape, F32),
        ],
        grid=(B, shape.HV, shape.V // BV),
        input_output_aliases={len(inputs) - 1: 4},
        compiler_params=compiler_params(cfg.launch_for(shape.K, shape.V)),
        interpret=interpret,
        name="gdn2_fused_decode_step",
    )(*inputs)
    if BV < shape.V:
        heads = (B, shape.HV, shape.V)
        gate = x[6].reshape(heads)
        o = _gated_rmsnorm(o.reshape(heads), gate, norm_weight, shape).astype(dtype).reshape(B, -1)
    return o, (hq, hk, hv), S_new
