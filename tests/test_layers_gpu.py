"""GatedDeltaRule2 against fla's real GatedDeltaNet2 (Triton kernels) on a CUDA GPU.

`python -m pytest -m gpu tests/test_layers_gpu.py` where torch has CUDA and JAX has a GPU. The
JAX layer runs backend="auto": the Pallas chunk kernels in training, the Pallas token-serial
kernel for short inference inputs; fla runs chunk_gdn2 (grad enabled) and fused_recurrent_gdn2
(no grad, T ≤ 64).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from testing import HIDDEN, jax_layer_from, kernel_names, make_fla_layer, rel_err

torch = pytest.importorskip("torch")
fla_gdn2 = pytest.importorskip("fla.layers.gdn2")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        jax.default_backend() != "gpu" or not torch.cuda.is_available(),
        reason="needs a CUDA GPU visible to both JAX and torch",
    ),
]

# float32 inputs: fla's Triton kernels and the Pallas kernels both multiply in TF32 (≈ 3e-4
# relative per product, D.4 of the paper); over a few hundred tokens and the layer's projections
# 2e-3 bounds the difference, an order of magnitude below any real mismatch (a wrong gate or
# layout gives errors ≥ 1e-1).
GPU_TOL = 2e-3
CASES = {
    "default": dict(num_heads=4, head_dim=64),
    "gva-negeig": dict(num_heads=2, head_dim=64, num_v_heads=4, allow_neg_eigval=True),
}


def _fla(seed, **kwargs):
    return make_fla_layer(fla_gdn2.GatedDeltaNet2, seed=seed, device="cuda", **kwargs)


@pytest.mark.parametrize("case", list(CASES))
def test_matches_fla_triton_layer_chunk(case):
    ref = _fla(0, **CASES[case])
    layer = jax_layer_from(ref)
    x = np.random.default_rng(1).standard_normal((2, 300, HIDDEN)).astype(np.float32)
    xt = torch.from_numpy(x).cuda().requires_grad_()
    y_ref = ref(xt)[0]
    cot = np.random.default_rng(2).standard_normal(y_ref.shape).astype(np.float32)
    (dx_ref,) = torch.autograd.grad(y_ref, xt, torch.from_numpy(cot).cuda())

    assert kernel_names(lambda x: layer(x), jnp.asarray(x))["gdn2_chunk_fwd_intra"] == 1
    y, vjp = jax.vjp(layer, jnp.asarray(x))
    (dx,) = vjp(jnp.asarray(cot))
    assert rel_err(y, y_ref.detach().cpu().numpy()) <= GPU_TOL
    assert rel_err(dx, dx_ref.cpu().numpy()) <= GPU_TOL


def test_matches_fla_triton_layer_short_inference():
    ref = _fla(3, **CASES["default"])
    layer = jax_layer_from(ref)
    layer.eval()
    x = np.random.default_rng(4).standard_normal((2, 40, HIDDEN)).astype(np.float32)
    with torch.no_grad():
        y_ref = ref(torch.from_numpy(x).cuda())[0].cpu().numpy()
    # The decoding kernel against fla's fused_recurrent_gdn2, and nothing else running.
    assert kernel_names(lambda x: layer(x), jnp.asarray(x)) == {"gdn2_recurrent_fwd": 1}
    assert rel_err(layer(jnp.asarray(x)), y_ref) <= GPU_TOL
