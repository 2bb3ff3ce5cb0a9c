"""The Gated DeltaNet-2 token mixer (paper Fig. 1, Appendix C.1).

Parameter names and shapes mirror the PyTorch `GatedDeltaNet2` of fla and NVIDIA (kernels are the
transposes of `nn.Linear` weights), so a checkpoint converts one-to-one.
"""

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from gdn2_jax.layers import context
from gdn2_jax.layers.conv import ShortConvolution
from gdn2_jax.layers.init import (
    GDN2_LINEAR_INIT,
    concat_kernels,
    dense,
    partitioned,
    project,
)
from gdn2_jax.layers.norm import GatedRMSNorm
from gdn2_jax.layers.segments import segment_starts
from gdn2_jax.ops import core, sharded
from gdn2_jax.options import (
    CHUNK_BACKENDS,
    DECODE_MODES,
    GATE_MODES,
    LAYER_MODES,
    OUTPUT_GATES,
    RECURRENT_BACKENDS,
    TIED_GATE_MODES,
)

# Inference inputs this short run token-serially, as fla's layer does: no chunk padding to pay.
SHORT_INPUT_LEN = 64
# Log-decay written at the first token of each packed document: exp(−80) ≈ 2e−35 wipes the state
# to far below float32 resolution, and the op is exact for any g ≤ 0 (no exp of its decays ever
# sees a positive argument), so one kernel call serves packed rows without a per-row count.
RESET_LOG_DECAY = -80.0
A_INIT_RANGE = (1.0, 16.0)
DT_INIT_RANGE = (1e-3, 1e-1)
DT_INIT_FLOOR = 1e-4


class GDN2Cache(NamedTuple):
    """Decoding state of one GDN-2 layer."""

    conv_q: jax.Array  # [B, W−1, H·K] inputs before the next token
    conv_k: jax.Array  # [B, W−1, H·K]
    conv_v: jax.Array  # [B, W−1, HV·V]
    S: jax.Array  # [B, HV, K, V] float32


def _a_log_init(key, shape, dtype=jnp.float32):
    return jnp.log(jax.random.uniform(key, shape, jnp.float32, *A_INIT_RANGE)).astype(dtype)


def _dt_bias_init(key, shape, dtype=jnp.float32):
    """softplus⁻¹(dt) with dt log-uniform in DT_INIT_RANGE, as the reference initializes it."""
    lo, hi = (math.log(x) for x in DT_INIT_RANGE)
    dt = jnp.exp(jax.random.uniform(key, shape, jnp.float32, lo, hi))
    dt = jnp.maximum(dt, DT_INIT_FLOOR)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)


def _check_config(hidden_size, num_heads, head_dim, expand_v, num_v_heads, **choices) -> int:
    """Validates the constructor arguments; returns head_v_dim."""
    for name, value in (("hidden_size", hidden_size), ("num_heads", num_heads)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if head_dim < 1:
        raise ValueError(f"head_dim must be >= 1, got {head_dim}")
    head_v_dim = round(head_dim * expand_v)
    if head_v_dim < 1 or not math.isclose(head_dim * expand_v, head_v_dim, rel_tol=1e-5):
        raise ValueError(
            f"expand_v={expand_v} times head_dim={head_dim} must be a positive integer"
        )
    if num_v_heads < num_heads or num_v_heads % num_heads:
        raise ValueError(f"num_v_heads={num_v_heads} must be a multiple of num_heads={num_heads}")
    allowed = {"output_gate": OUTPUT_GATES, "mode": LAYER_MODES, "gate_mode": GATE_MODES}
    allowed |= {"backend": CHUNK_BACKENDS, "recurrent_backend": RECURRENT_BACKENDS}
    allowed |= {"decode": DECODE_MODES}
    for name, value in choices.items():
        if value not in allowed[name]:
            raise ValueError(f"{name} must be one of {allowed[name]}, got {value!r}")
    return head_v_dim


def _hold_state_after(lengths, g, b, w):
    """g, b, w [B, T, HV, ·] with g = 0, b = w = 0 at t >= lengths[i]: there S_t = S_{t−1}."""
    pad = (jnp.arange(g.shape[1])[None, :] >= lengths[:, None])[..., None, None]
    return jnp.where(pad, 0.0, g), jnp.where(pad, 0, b), jnp.where(pad, 0, w)


class GatedDeltaRule2(nnx.Module):
    """GDN-2 mixer: x [B, T, hidden] -> [B, T, hidden].

    q, k: projection, causal short conv, SiLU, L2 norm (inside the op); v: projection, conv, SiLU.
    g = −exp(A_log) ⊙ softplus(f_proj(x) + dt_bias) in float32; b = σ(b_proj x) on the key axis,
    w = σ(w_proj x) on the value axis; output RMSNorm(o) · act(g_proj x), then o_proj.

    `gate_mode` selects the paper's Table 5 variants: "gdn2" (channel-wise b and w), "b_only"
    (w averaged over its channels), "w_only" (b averaged), "kda" (b = w = β, one scalar per value
    head from a b_proj of width num_v_heads, as fla's KDA layer; there `allow_neg_eigval` doubles β,
    which is both gates), "gdn" (Gated DeltaNet: kda's β and one log-decay per head, the channel
    mean of the decay branch, so its parameters are kda's). With `num_v_heads > num_heads` the
    key-side q, k, g, b are repeated over each group of value heads. After `.eval()`
    (deterministic) inputs of at most 64 tokens run the op's token-serial form, as does
    `mode="recurrent"` always, and so does the decoding `step`.

    When the active mesh splits tokens over "context" (training, eval), the short convolutions
    read the previous device's last W−1 tokens, document starts are read across device
    boundaries and the op runs per span (`gdn2_jax.ops.context`), all exact; `prefill` keeps
    whole sequences on every device of that axis, as decoding needs them.

    `backend` names the chunk form's implementation and `recurrent_backend` the token-serial
    form's (see `gdn2_jax.ops.registry`; "auto" takes the first that supports the inputs);
    `decode` the decoding `step`'s: "fused" (everything between the projection matmuls in one
    Pallas kernel, `pallas_kernels.decode`), "unfused" (XLA ops around the token-serial op) or
    "auto" (the default: fused where it can run, else unfused; `fused_decode_unsupported` says
    why not); `decode_block_v` the V columns of the state per program of the fused step and
    `decode_warps` its warps per program (None: `pallas_kernels.DEFAULT_DECODE_CONFIG`'s);
    `interpret=True` runs Pallas kernels in interpret mode (tests off a GPU).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        *,
        expand_v: float = 1.0,
        num_v_heads: int | None = None,
        conv_size: int = 4,
        allow_neg_eigval: bool = False,
        output_gate: str = "silu",
        norm_eps: float = 1e-5,
        mode: str = "chunk",
        gate_mode: str = "gdn2",
        backend: str = "auto",
        recurrent_backend: str = "auto",
        decode: str = "auto",
        decode_block_v: int | None = None,
        decode_warps: int | None = None,
        chunk_size: int = 64,
        interpret: bool = False,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        num_v_heads = num_heads if num_v_heads is None else num_v_heads
        self.head_v_dim = _check_config(
            hidden_size, num_heads, head_dim, expand_v, num_v_heads,
            output_gate=output_gate, mode=mode, gate_mode=gate_mode, backend=backend,
            recurrent_backend=recurrent_backend, decode=decode,
        )  # fmt: skip
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, head_dim
        self.num_v_heads = num_v_heads
        self.key_dim, self.value_dim = num_heads * head_dim, num_v_heads * self.head_v_dim
        self.allow_neg_eigval, self.mode, self.gate_mode = allow_neg_eigval, mode, gate_mode
        self.backend, self.recurrent_backend, self.decode = backend, recurrent_backend, decode
        if decode_block_v is not None and (
            decode_block_v < 16 or decode_block_v & (decode_block_v - 1)
        ):
            raise ValueError(
                f"decode_block_v must be None or a power of two >= 16, got {decode_block_v}"
            )
        if decode_warps is not None and decode_warps not in (1, 2, 4, 8):
            raise ValueError(f"decode_warps must be None or 1, 2, 4 or 8, got {decode_warps}")
        self.decode_block_v, self.decode_warps = decode_block_v, decode_warps
        self.output_gate = output_gate
        self.chunk_size, self.interpret, self.dtype = chunk_size, interpret, dtype
        self.deterministic = False
        self._build(conv_size, output_gate, norm_eps, param_dtype, rngs)

    def _build(self, conv_size, output_gate, norm_eps, param_dtype, rngs):
        D, Kd, Vd, Vh = self.hidden_size, self.key_dim, self.value_dim, self.head_v_dim
        kw = dict(init=GDN2_LINEAR_INIT, dtype=self.dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = dense(D, Kd, ("embed", "heads"), **kw)
        self.k_proj = dense(D, Kd, ("embed", "heads"), **kw)
        self.v_proj = dense(D, Vd, ("embed", "heads"), **kw)
        conv_kw = dict(param_dtype=param_dtype, dtype=self.dtype, rngs=rngs)
        self.q_conv1d = ShortConvolution(Kd, conv_size, **conv_kw)
        self.k_conv1d = ShortConvolution(Kd, conv_size, **conv_kw)
        self.v_conv1d = ShortConvolution(Vd, conv_size, **conv_kw)
        self.f_proj = nnx.Sequential(
            dense(D, Vh, ("embed", None), **kw), dense(Vh, Kd, (None, "heads"), **kw)
        )
        if self.gate_mode in TIED_GATE_MODES:
            self.b_proj = dense(D, self.num_v_heads, ("embed", None), **kw)
            self.w_proj = None
        else:
            self.b_proj = dense(D, Kd, ("embed", "heads"), **kw)
            self.w_proj = dense(D, Vd, ("embed", "heads"), **kw)
        self.A_log = nnx.Param(
            partitioned(_a_log_init, (None,))(rngs.params(), (self.num_heads,), param_dtype)
        )
        self.dt_bias = nnx.Param(
            partitioned(_dt_bias_init, ("heads",))(rngs.params(), (Kd,), param_dtype)
        )
        self.g_proj = nnx.Sequential(
            dense(D, Vh, ("embed", None), **kw), dense(Vh, Vd, (None, "heads"), use_bias=True, **kw)
        )
        self.o_norm = GatedRMSNorm(
            Vh,
            eps=norm_eps,
            activation=output_gate,
            dtype=self.dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.o_proj = dense(Vd, D, ("heads", "embed"), **kw)

    def _repeat_kv_groups(self, x):
        """[..., H, d] -> [..., HV, d]: each key head serves num_v_heads / num_heads value heads."""
        return jnp.repeat(x, self.num_v_heads // self.num_heads, axis=-2)

    def _split(self, x, d):
        return x.reshape(*x.shape[:-1], -1, d)

    def gates(self, x):
        """x [..., hidden] -> g [..., HV, K] (float32), b [..., HV, K], w [..., HV, V]."""
        w = None if self.w_proj is None else self.w_proj(x)
        return self._gates(self.f_proj(x), self.b_proj(x), w, self.dtype or x.dtype)

    def _gates(self, f, b_logit, w_logit, dtype):
        """`gates` from the projections f_proj(x), b_proj(x), w_proj(x) (None for tied gates)."""
        f = f.astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32)
        A = jnp.exp(self.A_log[...].astype(jnp.float32))
        g = jnp.einsum("h,...hk->...hk", -A, jax.nn.softplus(self._split(f, self.head_dim)))
        if self.gate_mode == "gdn":
            g = jnp.broadcast_to(jnp.mean(g, axis=-1, keepdims=True), g.shape)
        b, w = self._erase_write(b_logit, w_logit, dtype)
        return self._repeat_kv_groups(g), b, w

    def _erase_write(self, b_logit, w_logit, dtype):
        K, V = self.head_dim, self.head_v_dim
        scale = 2.0 if self.allow_neg_eigval else 1.0
        if self.gate_mode in TIED_GATE_MODES:
            beta = scale * jax.nn.sigmoid(b_logit.astype(jnp.float32))[..., None]
            lead = beta.shape[:-1]
            b, w = jnp.broadcast_to(beta, (*lead, K)), jnp.broadcast_to(beta, (*lead, V))
            return b.astype(dtype), w.astype(dtype)
        b = jax.nn.sigmoid(self._split(b_logit, K).astype(jnp.float32))
        w = jax.nn.sigmoid(self._split(w_logit, V).astype(jnp.float32))
        # Table 5's scalarized variants: average the gate over its channels, keep the projection.
        if self.gate_mode == "w_only":
            b = jnp.broadcast_to(jnp.mean(b, axis=-1, keepdims=True), b.shape)
        if self.gate_mode == "b_only":
            w = jnp.broadcast_to(jnp.mean(w, axis=-1, keepdims=True), w.shape)
        b = self._repeat_kv_groups(scale * b)
        return b.astype(dtype), w.astype(dtype)

    def _qkv(self, q, k, v):
        q = self._repeat_kv_groups(self._split(q, self.head_dim))
        k = self._repeat_kv_groups(self._split(k, self.head_dim))
        return q, k, self._split(v, self.head_v_dim)

    def _output(self, o, gate):
        """o [..., HV, V] and the output gate's projection g_proj(x) -> [..., hidden]."""
        o = self.o_norm(o, self._split(gate, self.head_v_dim))
        return self.o_proj(o.reshape(*o.shape[:-2], self.value_dim))

    def runs_token_serial(self, T: int, *, split: bool = False) -> bool:
        """mode="recurrent", and inference inputs of at most SHORT_INPUT_LEN tokens unless they are
        `split` over a context axis (the token-serial form has no context-parallel form)."""
        return self.mode == "recurrent" or (
            self.deterministic and T <= SHORT_INPUT_LEN and not split
        )

    def _rule(self, q, k, v, g, b, w, *, initial_state, output_final_state, split):
        """The op's token-serial or chunk form, per shard of the active mesh; `split`: the tokens
        are split over its context axis (else every device of that axis runs whole sequences)."""
        if self.runs_token_serial(q.shape[1], split=split):
            return sharded.gated_delta_rule2_recurrent(
                q, k, v, g, b, w,
                initial_state=initial_state,
                output_final_state=output_final_state,
                use_qk_l2norm=True,
                backend=self.recurrent_backend,
                interpret=self.interpret,
                context_parallel=split,
            )  # fmt: skip
        return sharded.gated_delta_rule2(
            q, k, v, g, b, w,
            initial_state=initial_state,
            output_final_state=output_final_state,
            use_qk_l2norm=True,
            backend=self.backend,
            chunk_size=self.chunk_size,
            interpret=self.interpret,
            context_parallel=split,
        )  # fmt: skip

    def _short_conv(self, conv, x, *, segment_ids, state, split, lengths):
        """conv(x) -> (y, its new state); `split`: from the previous device's last tokens (no
        state is kept, none is needed: only prefill, which does not split, builds a cache)."""
        if not split:
            return conv(x, segment_ids=segment_ids, state=state, lengths=lengths)
        y = context.context_parallel_short_conv(
            conv, x,
            segment_ids=segment_ids,
            context_axis=sharded.CONTEXT_AXIS,
            batch_axes=sharded.mesh_axes(sharded.BATCH_AXES, x.shape[0]) or (),
            channel_axes=sharded.mesh_axes(sharded.HEAD_AXES, conv.features) or (),
        )  # fmt: skip
        return y, None

    def _reset_at_document_starts(self, g, segment_ids, split):
        """g with RESET_LOG_DECAY at each token that opens a document; over a context split the
        first token of a span opens one only if its id differs from the previous span's last."""
        if split:
            starts = context.context_parallel_segment_starts(
                segment_ids,
                context_axis=sharded.CONTEXT_AXIS,
                batch_axes=sharded.mesh_axes(sharded.BATCH_AXES, segment_ids.shape[0]) or (),
            )
        else:
            starts = segment_starts(segment_ids)
        return jnp.where(starts[..., None, None], RESET_LOG_DECAY, g)

    def init_cache(self, batch_size: int, dtype=None) -> GDN2Cache:
        """An empty cache: zero conv history and zero state."""
        dtype = dtype or self.dtype or jnp.float32
        S = jnp.zeros((batch_size, self.num_v_heads, self.head_dim, self.head_v_dim), jnp.float32)
        return GDN2Cache(
            self.q_conv1d.init_state(batch_size, dtype),
            self.k_conv1d.init_state(batch_size, dtype),
            self.v_conv1d.init_state(batch_size, dtype),
            S,
        )

    def __call__(self, x, *, segment_ids=None):
        """x [B, T, hidden] -> [B, T, hidden]; `segment_ids` [B, T] resets at document starts."""
        y, _ = self._sequence(x, segment_ids=segment_ids, cache=None)
        return y

    def prefill(self, x, *, cache: GDN2Cache | None = None, lengths=None):
        """The sequence from `cache` (or zeros): x [B, T, hidden] -> (y, cache after it).

        `lengths` [B] int32: row i's input is x[i, :lengths[i]] (right padding after it); the
        cache is the one after that many tokens. Padding tokens run with g = 0 and b = w = 0,
        which leaves the state exactly as it was, and the conv history is read at each length.
        """
        # From zeros, S=None lets the op start from its own zero state: a zero state passed in
        # would be a constant whose value checks XLA folds at compile time (seconds at
        # [64, H, 128, 128]).
        cache = cache or self.init_cache(x.shape[0])._replace(S=None)
        return self._sequence(x, segment_ids=None, cache=cache, lengths=lengths)

    def _sequence(self, x, *, segment_ids, cache, lengths=None):
        # Prefill (a cache) keeps whole sequences per device: decoding continues from its state.
        split = cache is None and sharded.context_axis(x.shape[1]) is not None
        caches = (None,) * 3 if cache is None else cache[:3]
        conv = functools.partial(self._short_conv, segment_ids=segment_ids, split=split)
        q, cq = conv(self.q_conv1d, self.q_proj(x), state=caches[0], lengths=lengths)
        k, ck = conv(self.k_conv1d, self.k_proj(x), state=caches[1], lengths=lengths)
        v, cv = conv(self.v_conv1d, self.v_proj(x), state=caches[2], lengths=lengths)
        q, k, v = self._qkv(q, k, v)
        g, b, w = self.gates(x)
        if segment_ids is not None:
            g = self._reset_at_document_starts(g, segment_ids, split)
        if lengths is not None:
            g, b, w = _hold_state_after(lengths, g, b, w)
        o, S = self._rule(
            q, k, v, g, b, w,
            initial_state=None if cache is None else cache.S,
            output_final_state=cache is not None,
            split=split,
        )  # fmt: skip
        new_cache = None if cache is None else GDN2Cache(cq, ck, cv, S)
        return self._output(o, self.g_proj(x)), new_cache

    def fused_decode_unsupported(self, dtype) -> str | None:
        """Why the fused decoding step cannot run this layer's step in `dtype` (None if it can)."""
        if self.recurrent_backend == "scan":
            return 'recurrent_backend="scan" asks for the jnp reference step'
        if self.gate_mode != "gdn2":
            return f'it computes channel-wise gates (gate_mode="gdn2"), not {self.gate_mode!r}'
        if self.q_conv1d.kernel_size < 2:
            return f"it needs a conv size >= 2, got {self.q_conv1d.kernel_size}"
        if jax.default_backend() != "gpu" and not self.interpret:
            platform = jax.default_backend()
            return f"it is a Pallas kernel: it needs a GPU (this is {platform!r}) or interpret=True"
        mesh = jax.sharding.get_abstract_mesh()
        if not mesh.empty and mesh.size > 1:
            return "it has no partitioning rule, and a mesh of more than one device is active"
        try:
            unsupported = core.pallas_kernel("pallas_kernels", "decode_unsupported")
        except NotImplementedError as err:
            return str(err)
        dims = (self.head_dim, self.head_v_dim)
        return unsupported(*dims, (jnp.dtype(dtype),), cfg=self._decode_config())

    def _decode_config(self):
        cfg = core.pallas_kernel("pallas_kernels", "DEFAULT_DECODE_CONFIG")
        if self.decode_block_v is not None:
            cfg = dataclasses.replace(cfg, block_v=self.decode_block_v)
        if self.decode_warps is not None:
            launch = core.pallas_kernel("pallas_kernels", "Launch")
            cfg = dataclasses.replace(cfg, launch=launch(num_warps=self.decode_warps))
        return cfg

    def _decode_path(self, dtype) -> str:
        if self.decode == "unfused":
            return "unfused"
        reason = self.fused_decode_unsupported(dtype)
        if reason is None:
            return "fused"
        if self.decode == "fused":
            raise NotImplementedError(f'decode="fused" cannot run: {reason}')
        return "unfused"

    def _input_linears(self) -> list[nnx.Linear]:
        """The projections that read x directly: q, k, v, the first factors of f and g, b, w."""
        linears = [self.q_proj, self.k_proj, self.v_proj, self.f_proj.layers[0],
                   self.g_proj.layers[0], self.b_proj]  # fmt: skip
        return linears if self.w_proj is None else [*linears, self.w_proj]

    def step_kernel(self) -> jax.Array:
        """The kernels of the projections that read x, concatenated once for `step(kernel=)`."""
        return concat_kernels(self._input_linears())

    def _step_projections(self, x_t, kernel):
        """x_t -> q, k, v, f_proj(x_t), g_proj(x_t), b_proj(x_t), w_proj(x_t) (None for tied
        gates); the projections that read x_t as one matmul against `kernel` if given."""
        q, k, v, f, gate, b, *w = project(self._input_linears(), x_t, kernel)
        f, gate = self.f_proj.layers[1](f), self.g_proj.layers[1](gate)
        return q, k, v, f, gate, b, (w[0] if w else None)

    def step(self, x_t, cache: GDN2Cache, *, kernel=None):
        """One decoding token: x_t [B, hidden] -> (y_t [B, hidden], updated cache).

        `kernel`: this layer's `step_kernel()`, made once before a decoding loop, so that the
        projections of x_t read their weights in one matmul (the same numbers as without it).
        """
        dtype = self.dtype or x_t.dtype
        q, k, v, f, gate, b, w = self._step_projections(x_t, kernel)
        if self._decode_path(dtype) == "fused":
            return self._fused_step((q, k, v, f, b, w, gate), cache, dtype)
        q, cq = self.q_conv1d.step(q, cache.conv_q)
        k, ck = self.k_conv1d.step(k, cache.conv_k)
        v, cv = self.v_conv1d.step(v, cache.conv_v)
        q, k, v = self._qkv(q, k, v)
        g, b, w = self._gates(f, b, w, dtype)
        o, S = sharded.gated_delta_rule2_step(
            q, k, v, g, b, w, cache.S,
            use_qk_l2norm=True,
            backend=self.recurrent_backend,
            interpret=self.interpret,
        )  # fmt: skip
        return self._output(o, gate), GDN2Cache(cq, ck, cv, S)

    def _fused_step(self, projections, cache: GDN2Cache, dtype):
        """`step` with everything between the projections (q, k, v, f, b, w, g_proj(x_t)) in
        one kernel (same numbers)."""
        kernel = core.pallas_kernel("pallas_kernels", "fused_decode_step")
        shape_cls = core.pallas_kernel("pallas_kernels", "DecodeShape")
        shape = shape_cls(
            H=self.num_heads, HV=self.num_v_heads, K=self.head_dim, V=self.head_v_dim,
            W=self.q_conv1d.kernel_size, scale=self.head_dim**-0.5,
            b_scale=2.0 if self.allow_neg_eigval else 1.0, norm_eps=self.o_norm.eps,
            activation=self.output_gate,
        )  # fmt: skip
        convs = (self.q_conv1d, self.k_conv1d, self.v_conv1d)
        o, (cq, ck, cv), S = kernel(
            tuple(x.astype(dtype) for x in projections),
            (cache.conv_q, cache.conv_k, cache.conv_v),
            tuple(c.weight[...] for c in convs),
            self.A_log[...], self.dt_bias[...], self.o_norm.weight[...], cache.S,
            shape=shape, cfg=self._decode_config(), interpret=self.interpret,
        )  # fmt: skip
        return self.o_proj(o), GDN2Cache(cq, ck, cv, S)
