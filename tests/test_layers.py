"""The GatedDeltaRule2 layer: fla's PyTorch GatedDeltaNet2 cross-check (CPU), causality, the
kernel switch for short inference inputs, initialization, each gate_mode's reduction, bad configs.

On CPU fla's layer runs with its Triton-only pieces replaced by their PyTorch references:
`chunk_gdn2` / `fused_recurrent_gdn2` by `naive_recurrent_gdn2` (with fla's in-kernel q/k L2 norm),
`ShortConvolution` by a grouped `F.conv1d` + SiLU, and `FusedRMSNormGated` by a float32 RMSNorm
times the gate. `tests/test_layers_gpu.py` runs fla's real kernels on a GPU.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gdn2_jax.convert import layer_state_dict, load_layer_state_dict, to_torch
from gdn2_jax.layers import GATE_MODES, GatedDeltaRule2
from gdn2_jax.layers.gdn2 import SHORT_INPUT_LEN

torch = pytest.importorskip("torch")
fla_gdn2 = pytest.importorskip("fla.layers.gdn2")

# float32 end to end: fla's naive recurrence vs the chunkwise WY form (and the scan reference)
# differ by float32 rounding accumulated over ~100 tokens; 1e-4 is the bound.
FLA_TOL = 1e-4
HIDDEN = 48


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ---------------------------------------------------------------------------------------------
# fla's layer on CPU


def _torch_op(q, k, v, g, b, w, *, initial_state=None, output_final_state=False,
              use_qk_l2norm_in_kernel=False, cu_seqlens=None, **kwargs):  # fmt: skip
    """`chunk_gdn2` / `fused_recurrent_gdn2` through fla's PyTorch reference recurrence."""
    from fla.ops.gdn2.naive import naive_recurrent_gdn2

    assert cu_seqlens is None and not kwargs, kwargs
    if use_qk_l2norm_in_kernel:  # fla's l2norm: x · rsqrt(Σx² + 1e-6), in float32
        q, k = (x * torch.rsqrt(x.float().pow(2).sum(-1, keepdim=True) + 1e-6) for x in (q, k))
    return naive_recurrent_gdn2(
        q, k, v, g, b, w, initial_state=initial_state, output_final_state=output_final_state
    )


def _conv_forward(self, x, residual=None, mask=None, cache=None, output_final_state=False,
                  cu_seqlens=None, **kwargs):  # fmt: skip
    """fla's ShortConvolution without Triton: causal depthwise conv + SiLU, no cache."""
    assert residual is None and mask is None and cache is None and cu_seqlens is None
    W, T = self.kernel_size[0], x.shape[1]
    y = torch.nn.functional.conv1d(
        x.transpose(1, 2), self.weight, self.bias, padding=W - 1, groups=self.hidden_size
    )[..., :T]
    return torch.nn.functional.silu(y).transpose(1, 2), None


def _norm_forward(self, x, g, residual=None, prenorm=False, residual_in_fp32=False):
    """fla's FusedRMSNormGated without Triton: RMSNorm(x) · weight · act(g) in float32."""
    assert residual is None and not prenorm
    x32, g32 = x.float(), g.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()
    gate = torch.sigmoid(g32) if self.activation == "sigmoid" else torch.nn.functional.silu(g32)
    return (y * gate).to(x.dtype)


@pytest.fixture
def fla_on_cpu(monkeypatch):
    """fla's GatedDeltaNet2 class, patched to run on CPU with PyTorch references."""
    from fla.modules import FusedRMSNormGated, ShortConvolution

    monkeypatch.setattr(fla_gdn2, "chunk_gdn2", _torch_op)
    monkeypatch.setattr(fla_gdn2, "fused_recurrent_gdn2", _torch_op)
    monkeypatch.setattr(ShortConvolution, "forward", _conv_forward)
    monkeypatch.setattr(FusedRMSNormGated, "forward", _norm_forward)
    return fla_gdn2.GatedDeltaNet2


def make_fla_layer(cls, *, seed=0, output_gate="sigmoid", device="cpu", **kwargs):
    """A random fla GatedDeltaNet2 (every parameter perturbed, so zero-initialized biases and
    unit norm weights are exercised too) and the matching kwargs for GatedDeltaRule2."""
    torch.manual_seed(seed)
    layer = cls(hidden_size=HIDDEN, **kwargs)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name not in ("A_log", "dt_bias"):
                p.add_(0.1 * torch.randn_like(p))
    if output_gate == "silu":  # NVIDIA's layer: FusedRMSNormSwishGate
        layer.o_norm.activation = "swish"
    return layer.to(device).eval()


def jax_layer_from(fla_layer, *, output_gate="sigmoid", **kwargs):
    layer = GatedDeltaRule2(
        HIDDEN,
        fla_layer.num_heads,
        fla_layer.head_dim,
        expand_v=fla_layer.expand_v,
        num_v_heads=fla_layer.num_v_heads,
        allow_neg_eigval=fla_layer.allow_neg_eigval,
        output_gate=output_gate,
        norm_eps=fla_layer.o_norm.eps,
        rngs=nnx.Rngs(123),
        **kwargs,
    )
    return load_layer_state_dict(layer, fla_layer.state_dict())


@nnx.jit
def _forward_and_input_grad(layer, x, cot):
    y, vjp = jax.vjp(layer, x)
    return y, vjp(cot)[0]


FLA_CASES = {
    "default": dict(num_heads=2, head_dim=16),
    "gva-expand_v-negeig": dict(
        num_heads=2, head_dim=16, num_v_heads=4, expand_v=2.0, allow_neg_eigval=True
    ),
    "silu-gate": dict(num_heads=3, head_dim=16, output_gate="silu"),
}


@pytest.mark.parametrize("case", list(FLA_CASES))
def test_matches_fla_layer(fla_on_cpu, case):
    """T = 100: fla (grad enabled) takes its chunk path; the JAX layer its two-chunk XLA path."""
    kwargs = dict(FLA_CASES[case])
    gate = kwargs.pop("output_gate", "sigmoid")
    ref = make_fla_layer(fla_on_cpu, output_gate=gate, **kwargs)
    layer = jax_layer_from(ref, output_gate=gate)
    x = np.random.default_rng(1).standard_normal((2, 100, HIDDEN)).astype(np.float32)

    xt = torch.from_numpy(x).requires_grad_()
    y_ref, _, _ = ref(xt)
    cot = np.random.default_rng(2).standard_normal(y_ref.shape).astype(np.float32)
    (dx_ref,) = torch.autograd.grad(y_ref, xt, torch.from_numpy(cot))

    y, dx = _forward_and_input_grad(layer, jnp.asarray(x), jnp.asarray(cot))
    assert rel_err(y, y_ref.detach().numpy()) <= FLA_TOL
    assert rel_err(dx, dx_ref.numpy()) <= FLA_TOL


def test_matches_fla_layer_short_inference(fla_on_cpu):
    """T ≤ 64 in inference: fla switches to fused_recurrent, the JAX layer to its scan kernel."""
    ref = make_fla_layer(fla_on_cpu, num_heads=2, head_dim=16, seed=3)
    layer = jax_layer_from(ref)
    layer.eval()
    x = np.random.default_rng(4).standard_normal((2, 37, HIDDEN)).astype(np.float32)
    with torch.no_grad():
        y_ref = ref(torch.from_numpy(x))[0].numpy()
    assert rel_err(layer(jnp.asarray(x)), y_ref) <= FLA_TOL


# ---------------------------------------------------------------------------------------------
# The layer alone


def _layer(seed=0, **kwargs):
    kw = dict(num_heads=2, head_dim=16) | kwargs
    return GatedDeltaRule2(HIDDEN, kw.pop("num_heads"), kw.pop("head_dim"), rngs=nnx.Rngs(seed),
                           **kw)  # fmt: skip


def _x(B=1, T=40, seed=0):
    return jax.random.normal(jax.random.key(seed), (B, T, HIDDEN), jnp.float32)


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_causal_gradient_is_exactly_zero(mode):
    """∂y_t/∂x_s = 0 exactly for s > t (and nonzero at s = t), for several t."""
    layer = _layer(mode=mode, num_v_heads=4)
    x, ts = _x(T=70), jnp.array([0, 17, 63, 68])

    @nnx.jit
    def input_grads(layer, x):
        y, vjp = jax.vjp(layer, x)
        one_hot = jax.nn.one_hot(ts, x.shape[1])[:, None, :, None] * jnp.ones_like(y)
        return jax.vmap(lambda c: vjp(c)[0])(one_hot)

    dx = np.asarray(input_grads(layer, x))  # [len(ts), B, T, hidden]
    for i, t in enumerate(np.asarray(ts)):
        assert np.all(dx[i, :, t + 1 :] == 0.0), t
        assert np.any(dx[i, :, t] != 0.0), t


def test_recurrent_mode_equals_chunk_mode():
    x = _x(B=2, T=70)
    y_chunk = _layer(seed=3)(x)
    y_rec = _layer(seed=3, mode="recurrent")(x)
    assert rel_err(y_rec, y_chunk) < 1e-5


def test_short_inference_inputs_use_the_recurrent_kernel():
    layer = _layer()
    serial = {"recurrent": True, "backend": "auto"}  # the Pallas decoding kernel on a GPU
    chunk = {"backend": "auto", "chunk_size": 64}
    assert layer._op_kwargs(SHORT_INPUT_LEN) == chunk  # training: always the chunk kernel
    layer.eval()
    assert layer._op_kwargs(SHORT_INPUT_LEN) == serial
    assert layer._op_kwargs(SHORT_INPUT_LEN + 1) == chunk
    layer.train()
    assert layer._op_kwargs(1) == chunk
    assert _layer(mode="recurrent")._op_kwargs(10_000) == serial
    assert _layer(backend="xla", mode="recurrent")._op_kwargs(1)["backend"] == "scan"


def test_decay_init_matches_the_reference():
    """A = exp(A_log) ~ U[1, 16] per head; dt = softplus(dt_bias) log-uniform in [1e-3, 1e-1]."""
    layer = _layer(num_heads=64, head_dim=32)
    A = np.exp(np.asarray(layer.A_log[...]))
    dt = np.asarray(jax.nn.softplus(layer.dt_bias[...]))
    assert layer.A_log[...].shape == (64,) and layer.dt_bias[...].shape == (64 * 32,)
    assert A.min() >= 1.0 - 1e-5 and A.max() <= 16.0 + 1e-4 and A.max() - A.min() > 10
    assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 1e-1 * (1 + 1e-4)
    # log-uniform: about a quarter of the samples in each quarter of [ln 1e-3, ln 1e-1].
    quarter = np.floor((np.log(dt) - math.log(1e-3)) / (math.log(100) / 4)).clip(0, 3)
    np.testing.assert_allclose(np.bincount(quarter.astype(int), minlength=4) / dt.size, 0.25,
                               atol=0.04)  # fmt: skip


def test_param_names_and_shapes_mirror_fla():
    ref = fla_gdn2.GatedDeltaNet2(hidden_size=HIDDEN, head_dim=16, num_heads=2, num_v_heads=4,
                                  expand_v=2.0)  # fmt: skip
    layer = _layer(num_v_heads=4, expand_v=2.0)
    ours = {k: v.shape for k, v in layer_state_dict(layer).items()}
    assert ours == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    ref.load_state_dict(to_torch(layer_state_dict(layer)), strict=True)


# ---------------------------------------------------------------------------------------------
# gate_mode: the paper's Table 5 variants


def _gates(layer, x):
    g, b, w = layer.gates(x)
    return np.asarray(g), np.asarray(b), np.asarray(w)


def _is_constant(x, axis=-1):
    return np.all(x == np.take(x, [0], axis=axis))


@pytest.mark.parametrize("gate_mode", GATE_MODES)
def test_gate_structure(gate_mode):
    x = _x(T=9)
    tied = gate_mode in ("kda", "gdn")
    layer = _layer(gate_mode=gate_mode, num_v_heads=4, allow_neg_eigval=tied)
    g, b, w = _gates(layer, x)
    assert b.shape == (1, 9, 4, 16) and w.shape == (1, 9, 4, 16)
    assert _is_constant(b) == (gate_mode in ("kda", "w_only", "gdn"))
    assert _is_constant(w) == (gate_mode in ("kda", "b_only", "gdn"))
    assert _is_constant(g) == (gate_mode == "gdn")
    if tied:  # β = 2σ(b_proj x) per value head, both gates
        beta = 2.0 * jax.nn.sigmoid(layer.b_proj(x))
        np.testing.assert_array_equal(b, w)
        np.testing.assert_allclose(b[..., 0], beta, rtol=1e-6)
        assert layer.w_proj is None and layer.b_proj.kernel.shape == (HIDDEN, 4)


def _tie_columns(kernel, per_head):
    """[D, H·d] -> each head's d columns replaced by its first column."""
    D, n = kernel.shape
    k = kernel.reshape(D, n // per_head, per_head)
    return jnp.broadcast_to(k[..., :1], k.shape).reshape(D, n)


def test_kda_mode_is_gdn2_with_tied_gates():
    """gdn2 with b_proj/w_proj columns all equal to kda's β column per head == kda mode."""
    x = _x(B=2, T=70)
    kda = _layer(seed=5, gate_mode="kda")
    weights = layer_state_dict(kda)
    beta = weights["b_proj.weight"]  # [H, D]
    weights["b_proj.weight"] = weights["w_proj.weight"] = np.repeat(beta, 16, axis=0)
    gdn2 = load_layer_state_dict(_layer(), weights)
    assert rel_err(gdn2(x), kda(x)) < 1e-6


@pytest.mark.parametrize("gate_mode", ["b_only", "w_only"])
def test_scalarized_mode_is_gdn2_when_the_gate_is_already_scalar(gate_mode):
    """b_only / w_only average one gate over its channels: a no-op when that gate's projection
    columns are tied per head, so the mode then equals gdn2; with untied columns it differs."""
    x = _x(B=2, T=70)
    scalar = _layer(seed=6, gate_mode=gate_mode)
    gdn2 = _layer(seed=6)
    assert rel_err(scalar(x), gdn2(x)) > 1e-3
    proj = "w_proj" if gate_mode == "b_only" else "b_proj"
    for layer in (scalar, gdn2):
        kernel = getattr(layer, proj).kernel
        kernel[...] = _tie_columns(kernel[...], 16)
    assert rel_err(scalar(x), gdn2(x)) < 1e-6


def test_gdn_mode_is_kda_with_one_decay_per_head():
    """gdn averages kda's log-decay over the key channels: with f_proj's output columns tied per
    head (every channel's decay already equal) the two modes agree; untied, they differ."""
    x = _x(B=2, T=70)
    gdn, kda = _layer(seed=7, gate_mode="gdn"), _layer(seed=7, gate_mode="kda")
    assert rel_err(gdn(x), kda(x)) > 1e-3
    for layer in (gdn, kda):
        up = layer.f_proj.layers[1]
        up.kernel[...] = _tie_columns(up.kernel[...], 16)
        layer.dt_bias[...] = _tie_columns(layer.dt_bias[...][None], 16)[0]
    assert rel_err(gdn(x), kda(x)) < 1e-6


# ---------------------------------------------------------------------------------------------
# Bad configurations


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_v_heads": 3}, "num_v_heads"),
        ({"num_v_heads": 1}, "num_v_heads"),
        ({"expand_v": 0.3}, "expand_v"),
        ({"output_gate": "relu"}, "output_gate"),
        ({"mode": "fused"}, "mode"),
        ({"gate_mode": "beta"}, "gate_mode"),
        ({"backend": "cuda"}, "backend"),
        ({"conv_size": 0}, "conv_size"),
        ({"num_heads": 0}, "num_heads"),
        ({"head_dim": 0}, "head_dim"),
    ],
)
def test_bad_config_raises(kwargs, field):
    with pytest.raises(ValueError, match=field):
        _layer(**kwargs)


def test_bad_hidden_size_raises():
    with pytest.raises(ValueError, match="hidden_size"):
        GatedDeltaRule2(0, 2, 16, rngs=nnx.Rngs(0))
