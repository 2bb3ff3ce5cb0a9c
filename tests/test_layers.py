"""The GatedDeltaRule2 layer: fla's PyTorch GatedDeltaNet2 cross-check (CPU, see
the `fla_on_cpu` fixture), causality, which form of the op runs (the kernels in the traced program),
initialization, each gate_mode's reduction, bad configs. `tests/test_layers_gpu.py` runs fla's
real kernels on a GPU.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from testing import HIDDEN, jax_layer_from, kernel_names, make_fla_layer, rel_err

from gdn2_jax.convert import layer_state_dict, load_layer_state_dict, to_torch
from gdn2_jax.layers import GATE_MODES, GatedDeltaRule2
from gdn2_jax.layers.gdn2 import SHORT_INPUT_LEN

torch = pytest.importorskip("torch")
fla_gdn2 = pytest.importorskip("fla.layers.gdn2")

# float32 end to end: fla's naive recurrence vs the chunkwise WY form (and the scan reference)
# differ by float32 rounding accumulated over ~100 tokens, well under 1e-4.
FLA_TOL = 1e-4
# Names of the Pallas kernels each form of the op runs (interpret mode on CPU).
CHUNK_KERNEL = "gdn2_chunk_fwd_intra"
SERIAL_KERNEL = "gdn2_recurrent_fwd"
FUSED_DECODE_KERNEL = "gdn2_fused_decode_step"


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
    """Two different computations (the token-serial scan, the chunkwise XLA form) agree, forward
    and input gradient."""
    x = _x(B=2, T=70)
    chunk, serial = _layer(seed=3), _layer(seed=3, mode="recurrent")
    cot = jax.random.normal(jax.random.key(9), x.shape)
    y_chunk, dx_chunk = _forward_and_input_grad(chunk, x, cot)
    y_rec, dx_rec = _forward_and_input_grad(serial, x, cot)
    assert kernel_names(lambda x: serial(x), x) == {}, "scan and xla run no Pallas kernel"
    # float32, the same math summed in another order over 70 tokens.
    assert 0.0 < rel_err(y_rec, y_chunk) < 1e-5, "different paths, float32 agreement"
    assert rel_err(dx_rec, dx_chunk) < 1e-5


def _kernels(layer, T, *, step=False):
    """The Pallas kernels the layer's forward (or decoding step) runs on a [2, T] input."""
    if step:
        cache = layer.init_cache(2)
        return kernel_names(lambda x: layer.step(x, cache), _x(B=2, T=1)[:, 0])
    return kernel_names(lambda x: layer(x), _x(B=2, T=T))


def test_each_form_runs_its_kernel():
    """Training always runs the chunk kernels; inference inputs of at most SHORT_INPUT_LEN tokens,
    mode="recurrent" run the token-serial kernel, and nothing else; the decoding step runs the
    fused step kernel (decode="auto", the default, where it can run), or the token-serial kernel
    with decode="unfused"."""
    layer = _layer(interpret=True)
    assert _kernels(layer, SHORT_INPUT_LEN)[CHUNK_KERNEL] == 1
    assert SERIAL_KERNEL not in _kernels(layer, 1)
    layer.eval()
    assert _kernels(layer, SHORT_INPUT_LEN) == {SERIAL_KERNEL: 1}
    assert _kernels(layer, SHORT_INPUT_LEN + 1)[CHUNK_KERNEL] == 1
    assert _kernels(layer, 1, step=True) == {FUSED_DECODE_KERNEL: 1}
    unfused = _layer(interpret=True, decode="unfused")
    assert _kernels(unfused, 1, step=True) == {SERIAL_KERNEL: 1}
    recurrent = _layer(mode="recurrent", interpret=True)
    assert _kernels(recurrent, 3 * SHORT_INPUT_LEN) == {SERIAL_KERNEL: 1}


def test_each_form_takes_its_own_backend():
    layer = _layer(backend="pallas", recurrent_backend="scan", interpret=True)
    layer.eval()
    assert _kernels(layer, SHORT_INPUT_LEN) == {}
    assert _kernels(layer, 1, step=True) == {}
    assert _kernels(layer, SHORT_INPUT_LEN + 1)[CHUNK_KERNEL] == 1
    serial_only = _layer(backend="xla", recurrent_backend="pallas", interpret=True, decode="auto")
    assert _kernels(serial_only, SHORT_INPUT_LEN) == {}
    assert _kernels(serial_only, 1, step=True) == {FUSED_DECODE_KERNEL: 1}
    unfused = _layer(backend="xla", recurrent_backend="pallas", interpret=True, decode="unfused")
    assert _kernels(unfused, 1, step=True) == {SERIAL_KERNEL: 1}


def test_pallas_without_interpret_off_a_gpu_is_an_error():
    if jax.default_backend() == "gpu":
        pytest.skip("on a GPU the kernels compile")
    with pytest.raises(NotImplementedError, match="interpret=True"):
        _layer(backend="pallas")(_x())
    with pytest.raises(NotImplementedError, match="interpret=True"):
        _layer(recurrent_backend="pallas", mode="recurrent")(_x())


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
