"""Helpers the test modules share: relative error, the Pallas kernels a traced program runs,
and fla's PyTorch GatedDeltaNet2 layer on a CPU (with its Triton-only pieces replaced by their
PyTorch references) plus the matching GatedDeltaRule2.

On CPU fla's layer runs `chunk_gdn2` / `fused_recurrent_gdn2` as `naive_recurrent_gdn2` (with
fla's in-kernel q/k L2 norm), `ShortConvolution` as a grouped `F.conv1d` + SiLU, and
`FusedRMSNormGated` as a float32 RMSNorm times the gate.
"""

import collections

import jax
import jax.extend
import pytest
from flax import nnx

from gdn2_jax.convert import load_layer_state_dict
from gdn2_jax.crosscheck import rel_err
from gdn2_jax.layers import GatedDeltaRule2

torch = pytest.importorskip("torch")
fla_gdn2 = pytest.importorskip("fla.layers.gdn2")

HIDDEN = 48

__all__ = [
    "HIDDEN",
    "jax_layer_from",
    "kernel_launches",
    "kernel_names",
    "make_fla_layer",
    "patch_fla_for_cpu",
    "primitives_outside_kernels",
    "rel_err",
]


def _sub_jaxprs(eqn):
    for value in eqn.params.values():
        for item in value if isinstance(value, tuple | list) else (value,):
            if isinstance(item, jax.extend.core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jax.extend.core.Jaxpr):
                yield item


# The primitives of a Pallas kernel launch: pallas_call (Triton lowering) and mpmd_map
# (`plgpu.kernel`, Mosaic GPU).
KERNEL_PRIMITIVES = ("pallas_call", "mpmd_map")


def _pallas_calls(jaxpr):
    """Every kernel launch equation of `jaxpr`, through its nested jaxprs."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in KERNEL_PRIMITIVES:
            yield eqn
            continue
        for sub in _sub_jaxprs(eqn):
            yield from _pallas_calls(sub)


def kernel_names(fn, *args, **kwargs) -> collections.Counter:
    """How often each named kernel launch occurs in the traced program of fn(*args, **kwargs),
    through every nested jaxpr (jit, custom_vjp, shard_map, checkpoint, scan, while)."""
    jaxpr = jax.make_jaxpr(fn)(*args, **kwargs)
    return collections.Counter(eqn.params["name"] for eqn in _pallas_calls(jaxpr.jaxpr))


def _outside_kernels(jaxpr):
    """Every equation of `jaxpr` and its nested jaxprs, except those inside a pallas_call."""
    for eqn in jaxpr.eqns:
        yield eqn
        if eqn.primitive.name not in KERNEL_PRIMITIVES:
            for sub in _sub_jaxprs(eqn):
                yield from _outside_kernels(sub)


def primitives_outside_kernels(fn, *args, **kwargs) -> collections.Counter:
    """How often each primitive occurs in fn's traced program outside its Pallas kernels."""
    jaxpr = jax.make_jaxpr(fn)(*args, **kwargs)
    return collections.Counter(eqn.primitive.name for eqn in _outside_kernels(jaxpr.jaxpr))


def kernel_launches(fn, *args, **kwargs) -> dict:
    """name -> the Triton compiler params of each named pallas_call in fn's traced program."""
    jaxpr = jax.make_jaxpr(fn)(*args, **kwargs)
    launches = collections.defaultdict(list)
    for eqn in _pallas_calls(jaxpr.jaxpr):
        launches[eqn.params["name"]].append(eqn.params["compiler_params"])
    return dict(launches)


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


def patch_fla_for_cpu(monkeypatch):
    """fla's GatedDeltaNet2 class, patched to run on CPU with PyTorch references (the
    `fla_on_cpu` fixture of conftest.py)."""
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
