"""The forward state pass in Mosaic GPU (`ChunkConfig(state_lowering="mosaic")`) on CPU: under
Pallas's Mosaic GPU interpreter against the Triton walk and the float32 XLA core, its lowering
for Hopper, and what it refuses. tests/test_pallas_gpu.py runs it compiled on a GPU."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from testing import kernel_names

from gdn2_jax.crosscheck import NAMES, Shape, make_inputs, rel_err
from gdn2_jax.ops.core import xla_chunk_core
from gdn2_jax.ops.layout import dense_segments, packed_segments
from pallas_kernels import DEFAULT_CHUNK_CONFIG, ChunkConfig, Launch, pallas_chunk_core
from pallas_kernels.common import numerics_for
from pallas_kernels.state_mosaic import SHARED_PER_BLOCK, chunk_state_mosaic, shared_bytes

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

MOSAIC = dataclasses.replace(DEFAULT_CHUNK_CONFIG, state_lowering="mosaic")
SHAPE = Shape(B=1, T=192, H=2, K=64, V=64)
BOUNDS = (0, 1, 1, 3)  # three packed sequences: one chunk, an empty one, two chunks


def _inputs(seed):
    """bf16 inputs (g float32) of three packed sequences with initial states, mild gates so
    the carried state matters, and the padding slot's zero state."""
    x = make_inputs(seed, SHAPE, g_scale=3e-3)
    args = [jnp.asarray(x[n], jnp.float32 if n == "g" else jnp.bfloat16) for n in NAMES[:6]]
    h0 = jnp.asarray(make_inputs(seed + 1, dataclasses.replace(SHAPE, B=3))["initial_state"])
    h0s = jnp.concatenate([h0[:, None], jnp.zeros_like(h0[:1, None])])
    return args, h0s, packed_segments(jnp.asarray(BOUNDS, jnp.int32), SHAPE.T // 64)


def _outputs_and_grads(core, args, h0s, seg):
    out, vjp = jax.vjp(lambda *a: core(*a, seg, SHAPE.K**-0.5, 64), *args, h0s)
    keys = jax.random.split(jax.random.key(7), 2)
    cot = tuple(
        jax.random.normal(k, o.shape).astype(o.dtype) for k, o in zip(keys, out, strict=True)
    )
    return (*out, *vjp(cot))


@pytest.mark.parametrize("parts", [1, 2])
def test_mosaic_state_pass_matches_the_triton_walk(parts):
    """Output, finals and every gradient (through the saved S₀ and R) under the Mosaic pass
    match the Triton walk's to within a few flipped last bits: both passes round the same
    float32 values to bf16 at the same points, and only the CPU dots' summation order differs
    (dropping the decay γ from the Mosaic pass moves these errors to 0.16-0.5). Both are within
    bf16 error of the float32 XLA core. parts=2 walks the second run from the state its maps
    carry in."""
    args, h0s, seg = _inputs(61)
    mosaic = dataclasses.replace(MOSAIC, state_parts=parts)
    triton = dataclasses.replace(DEFAULT_CHUNK_CONFIG, state_parts=parts)
    ours = _outputs_and_grads(lambda *a: pallas_chunk_core(*a, mosaic, True), args, h0s, seg)
    walk = _outputs_and_grads(lambda *a: pallas_chunk_core(*a, triton, True), args, h0s, seg)
    f32 = [a.astype(jnp.float32) for a in args]
    reference = _outputs_and_grads(xla_chunk_core, f32, h0s, seg)
    for n, (a, b, r) in enumerate(zip(ours, walk, reference, strict=True)):
        assert rel_err(a, b) <= 1e-3, n
        assert rel_err(a, r) <= 2e-2, n


def test_the_op_runs_the_mosaic_state_pass():
    """The Mosaic launch replaces the Triton state pass, forward and under differentiation."""
    args, h0s, seg = _inputs(62)

    def core(*a):
        return pallas_chunk_core(*a, h0s, seg, 0.125, 64, MOSAIC, True)

    names = kernel_names(core, *args)
    assert names["gdn2_chunk_fwd_state_mosaic"] == 1 and "gdn2_chunk_fwd_state" not in names
    grad = jax.grad(lambda *a: jnp.sum(core(*a)[0].astype(jnp.float32)), argnums=(0, 1, 2))
    names = kernel_names(grad, *args)
    assert names["gdn2_chunk_fwd_state_mosaic_save"] == 1
    assert "gdn2_chunk_fwd_state_save" not in names


def _abstract_pass_inputs(K, V, NT, BH=2):
    bf, f32 = jnp.bfloat16, jnp.float32
    sd = jax.ShapeDtypeStruct
    Tp = NT * 64
    intra = {
        "y": sd((BH, Tp, K), bf), "u": sd((BH, Tp, V), bf), "kt": sd((BH, Tp, K), bf),
        "qg": sd((BH, Tp, K), bf), "aqk": sd((BH, Tp, 64), bf), "gc": sd((BH, NT, K), f32),
    }  # fmt: skip
    return intra, sd((2, 1, BH, K, V), f32)


@pytest.mark.parametrize("K", [64, 128])
@pytest.mark.parametrize("save", [False, True])
def test_mosaic_state_pass_lowers_for_hopper(K, save):
    """The pass lowers to a Mosaic GPU module for CUDA without a GPU: Pallas's lowering checks
    every TMA, layout and wgmma operand shape and transform on the way. One walk per row (the
    runs' maps are a Triton launch, which lowers only where a GPU is)."""
    intra, h0s = _abstract_pass_inputs(K, 128, NT=4)
    num = numerics_for(jnp.bfloat16, interpret=False)
    cfg = dataclasses.replace(MOSAIC, state_parts=1)

    def run(intra, h0s):
        return chunk_state_mosaic(
            intra, h0s, dense_segments(4), jnp.bfloat16, cfg=cfg, num=num, save=save
        )

    text = jax.jit(run).trace(intra, h0s).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_mosaic_state_pass_fits_shared_memory_at_two_stages():
    """The default tile (K = 128, 64 state columns) at two stages fits a Hopper block; three do
    not, and the config says so instead of failing at launch."""
    assert shared_bytes(128, 64, 2) <= SHARED_PER_BLOCK < shared_bytes(128, 64, 3)
    intra, h0s = _abstract_pass_inputs(128, 128, NT=4)
    cfg = dataclasses.replace(MOSAIC, state=Launch(4, 3))
    num = numerics_for(jnp.bfloat16, interpret=False)
    with pytest.raises(NotImplementedError, match="shared memory"):
        jax.eval_shape(
            lambda i, h: chunk_state_mosaic(
                i, h, dense_segments(4), jnp.bfloat16, cfg=cfg, num=num, save=False
            ),
            intra, h0s,
        )  # fmt: skip


@pytest.mark.parametrize(
    ("dtype", "K", "match"),
    [(jnp.float32, 64, "16-bit"), (jnp.bfloat16, 32, "K in")],
)
def test_mosaic_state_pass_refuses_what_it_cannot_run(dtype, K, match):
    x = make_inputs(63, Shape(B=1, T=64, H=2, K=K, V=64))
    args = [jnp.asarray(x[n], jnp.float32 if n == "g" else dtype) for n in NAMES[:6]]
    h0s = jnp.zeros((2, 1, 2, K, 64), jnp.float32)
    with pytest.raises(NotImplementedError, match=match):
        pallas_chunk_core(*args, h0s, dense_segments(1), 0.125, 64, MOSAIC, True)


def test_mosaic_state_pass_needs_a_structure_with_the_fused_output():
    with pytest.raises(ValueError, match="state_lowering='mosaic'"):
        ChunkConfig(state_lowering="mosaic", structure="split")
