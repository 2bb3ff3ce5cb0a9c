"""The Pallas kernels compiled for a GPU (Triton lowering): `pytest -m gpu` on a Hopper GPU.

The op's shared suite for backend="pallas" (float32 inputs run TF32×3 matmuls, so the shared
float32 tolerances hold), production head sizes in float32 and bfloat16 against fla's naive
recurrence (CPU, float32), the split forward structure (`ChunkConfig(structure="split")` with
its options), the decoding kernel, and what "auto" picks on a GPU. Skipped where JAX has no GPU.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from op_testing import OpBackendTests
from test_op_values import DenseValueTests, PackedValueTests
from test_pallas import SPLIT_FORWARD, bind_chunk_config, fla_recurrent
from testing import kernel_names

from gdn2_jax.crosscheck import (
    NAMES,
    Shape,
    jax_forward_and_grads,
    make_cotangents,
    make_inputs,
    rel_err,
    torch_reference,
)
from gdn2_jax.ops import gated_delta_rule2, gated_delta_rule2_recurrent, gated_delta_rule2_step
from pallas_kernels import Launch, default_chunk_config
from pallas_kernels.recurrent import recurrent

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


class TestPallasGpu(OpBackendTests):
    backend = "pallas"


class TestPallasGpuValues(PackedValueTests):
    """Hard resets and bad values through the compiled chunk kernels."""

    backend = "pallas"


class TestPallasGpuTokenSerialValues(DenseValueTests):
    """Hard resets and bad values through the compiled token-serial kernel."""

    backend = "pallas"
    form = "recurrent"


def _errors(x, dtype, **kwargs):
    shape = Shape(*x["q"].shape[:3], x["q"].shape[3], x["v"].shape[3])
    cot = make_cotangents(0, shape)
    o_ref, S_ref, g_ref = torch_reference(x, cot)

    def op(q, k, v, g, b, w, **kw):
        cast = [a.astype(dtype) for a in (q, k, v, b, w)]
        o, S = gated_delta_rule2(*cast[:3], g, *cast[3:], backend="pallas", **kw, **kwargs)
        return o.astype(jnp.float32), S

    o, S, grads = jax_forward_and_grads(x, cot, fn=op)
    errors = {"o": rel_err(o, o_ref), "S": rel_err(S, S_ref)}
    return errors | {n: rel_err(grads[n], g_ref[n]) for n in grads}


@pytest.mark.parametrize("dims", [(64, 64), (128, 128), (256, 256)])
@pytest.mark.parametrize("extreme", [False, True])
def test_float32_production_heads(dims, extreme):
    x = make_inputs(50, Shape(B=2, T=200, H=2, K=dims[0], V=dims[1]), extreme=extreme)
    errors = _errors(x, jnp.float32)
    # TF32×3 matmuls and an exact solve: float32-level agreement, as the shared suite's.
    assert all(e <= 1e-3 for e in errors.values()), errors
    assert errors["o"] <= 1e-4, errors


@pytest.mark.parametrize("dims", [(64, 64), (128, 128), (256, 256)])
def test_bfloat16_production_heads(dims):
    x = make_inputs(51, Shape(B=2, T=200, H=2, K=dims[0], V=dims[1]))
    errors = _errors(x, jnp.bfloat16)
    # bf16 inputs, bf16 intermediates (as fla's kernels) and 8-bit mantissas: ~1e-2.
    assert errors["o"] <= 2e-2 and errors["S"] <= 2e-2, errors
    assert all(e <= 5e-2 for e in errors.values()), errors


def test_packed_bfloat16_matches_separate_runs():
    cu = np.array([0, 70, 70, 200, 333], np.int32)
    x = make_inputs(52, Shape(B=1, T=333, H=2, K=128, V=128), with_h0=False)
    args = [jnp.asarray(x[n], jnp.float32 if n == "g" else jnp.bfloat16) for n in NAMES[:6]]
    o, S = gated_delta_rule2(
        *args, cu_seqlens=jnp.asarray(cu), output_final_state=True, backend="pallas"
    )
    for n in range(len(cu) - 1):
        lo, hi = int(cu[n]), int(cu[n + 1])
        if hi == lo:
            assert float(jnp.abs(S[n]).max()) == 0.0
            continue
        o_ref, S_ref = fla_recurrent(x, lo, hi, np.zeros_like(S[n : n + 1]))
        assert rel_err(o[:, lo:hi].astype(jnp.float32), o_ref) <= 2e-2, n
        assert rel_err(S[n : n + 1], S_ref) <= 2e-2, n


# The split forward with every new option; the backward is the fused structure's.
SPLIT_ALL = dict(
    structure="split", diag_store="columns", diag_inverse="doubling", diag_loop_block_k=None
)


@pytest.fixture
def split_kernels(monkeypatch):
    """Binds the split forward, on the tuned tiles of the inputs' dtype, into the op."""

    def bind(dtype):
        cfg = dataclasses.replace(default_chunk_config(dtype), **SPLIT_ALL)
        bind_chunk_config(monkeypatch, cfg)

    return bind


@pytest.mark.parametrize("dims", [(128, 128), (256, 64)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_split_structure_production_heads(dims, dtype, split_kernels):
    """The split forward compiled for the GPU, extreme gates and initial states, against fla's
    naive recurrence with the fused structure's tolerances (the same products, reordered)."""
    split_kernels(dtype)
    _check_production_heads(dims, dtype, SPLIT_FORWARD)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_token_diagonal_grid_production_heads(dtype, monkeypatch):
    """diag_grid="token" (one program per token row for the diagonal blocks) compiled for the
    GPU under the fused structure, against fla's naive recurrence."""
    cfg = dataclasses.replace(default_chunk_config(dtype), diag_grid="token")
    bind_chunk_config(monkeypatch, cfg)
    _check_production_heads((128, 128), dtype, {"gdn2_chunk_fwd_diag": 1})


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lean_launches_production_heads(dtype, monkeypatch):
    """A configuration of fewer registers a launch: the levels diagonal at K slices of 16 on 4
    warps, the split solve's score blocks in two K loops of 16, the backward's diagonal on 4
    warps and intra K tile of 32; compiled for the GPU under the split prep, against fla's
    naive recurrence."""
    cfg = dataclasses.replace(
        default_chunk_config(dtype), structure="split_prep", diag_inverse="doubling",
        diag_blocks="levels", diag_block_k=16, diag=Launch(4, 1), intra_block_k=16,
        solve_scores="apart", intra_bwd_diag=Launch(4, 1), intra_bwd_block_k=32,
    )  # fmt: skip
    bind_chunk_config(monkeypatch, cfg)
    _check_production_heads((128, 128), dtype, {"gdn2_chunk_fwd_diag": 1})


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_k_sliced_column_loop_production_heads(dtype, monkeypatch):
    """The forward diagonal's column loop over K slices of 16 (78 registers against 255),
    compiled for the GPU under the split prep, against fla's naive recurrence."""
    cfg = dataclasses.replace(
        default_chunk_config(dtype), structure="split_prep", diag_inverse="doubling",
        diag_loop_block_k=16,
    )  # fmt: skip
    bind_chunk_config(monkeypatch, cfg)
    _check_production_heads((128, 128), dtype, {"gdn2_chunk_fwd_diag": 1})


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_state_pass_in_runs_production_heads(dtype, monkeypatch):
    """The forward state pass in 3 runs per row (`state_parts`: the runs' maps, their carry,
    the walk from each run's entering state), compiled for the GPU, against fla's naive
    recurrence. The extreme gates make the maps vanish: tests/test_pallas.py checks them
    under mild gates in interpret mode."""
    cfg = dataclasses.replace(default_chunk_config(dtype), state_parts=3)
    bind_chunk_config(monkeypatch, cfg)
    _check_production_heads((128, 128), dtype, {"gdn2_chunk_fwd_part_maps": 1})


@pytest.mark.parametrize("dims", [(128, 128), (256, 64)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cumsum_launch_production_heads(dims, dtype, monkeypatch):
    """cumsum="pallas" (G and the chunk totals from one launch, lax.cumsum in Triton),
    compiled for the GPU, against fla's naive recurrence."""
    cfg = dataclasses.replace(default_chunk_config(dtype), cumsum="pallas")
    bind_chunk_config(monkeypatch, cfg)
    _check_production_heads(dims, dtype, {"gdn2_chunk_cumsum": 1})


@pytest.mark.parametrize("parts", [1, 3])
def test_mosaic_state_pass_production_heads(parts, monkeypatch):
    """state_lowering="mosaic" (the state pass on wgmma with TMA loads), compiled for Hopper,
    in one walk and in 3 runs, against fla's naive recurrence, every gradient."""
    cfg = dataclasses.replace(
        default_chunk_config(jnp.bfloat16), state_lowering="mosaic", state_parts=parts
    )
    bind_chunk_config(monkeypatch, cfg)
    _check_production_heads((128, 128), jnp.bfloat16, {"gdn2_chunk_fwd_state_mosaic": 1})


def _check_production_heads(dims, dtype, launches):
    """Extreme gates and initial states; `launches` name -> count in the traced program."""
    x = make_inputs(57, Shape(B=2, T=200, H=2, K=dims[0], V=dims[1]), extreme=True)
    args = [jnp.asarray(x[n], jnp.float32 if n == "g" else dtype) for n in NAMES[:6]]
    names = kernel_names(lambda *a: gated_delta_rule2(*a, backend="pallas"), *args)
    assert {n: names[n] for n in launches} == launches
    errors = _errors(x, dtype)
    if dtype == jnp.float32:
        assert all(e <= 1e-3 for e in errors.values()) and errors["o"] <= 1e-4, errors
    else:
        assert errors["o"] <= 2e-2 and errors["S"] <= 2e-2, errors
        assert all(e <= 5e-2 for e in errors.values()), errors


def test_split_structure_packed_bfloat16(split_kernels):
    split_kernels(jnp.bfloat16)
    test_packed_bfloat16_matches_separate_runs()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_recurrent_kernel_on_gpu(dtype):
    x = make_inputs(53, Shape(B=2, T=40, H=2, K=128, V=128), extreme=True)
    args = [jnp.asarray(x[n], jnp.float32 if n == "g" else dtype) for n in NAMES[:6]]
    o, S = recurrent(*args, jnp.asarray(x["initial_state"]))
    o_ref, S_ref = fla_recurrent(x)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2  # elementwise float32 math either way
    assert rel_err(o.astype(jnp.float32), o_ref) <= tol and rel_err(S, S_ref) <= tol


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_recurrent_entry_point_and_step_on_gpu(dtype):
    """The op-level wiring of the decoding kernel (forward on the kernel, gradient through the
    scan's VJP, packed sequences, the one-token step) compiled for the GPU."""
    x = make_inputs(54, Shape(B=1, T=48, H=2, K=128, V=128), extreme=True)
    args = [jnp.asarray(x[n], jnp.float32 if n == "g" else dtype) for n in NAMES[:6]]
    h0 = jnp.asarray(x["initial_state"])
    h0 = jnp.concatenate([h0, 0.5 * h0, -h0])
    kw = dict(cu_seqlens=jnp.asarray([0, 17, 17, 48], jnp.int32), output_final_state=True)

    def run(backend):
        def loss(*a):
            o, S = gated_delta_rule2_recurrent(*a[:6], initial_state=a[6], backend=backend, **kw)
            o = o.astype(jnp.float32)
            return jnp.sum(o * o) + jnp.sum(jnp.sin(S)), (o, S)

        grads, out = jax.jit(jax.grad(loss, argnums=tuple(range(7)), has_aux=True))(*args, h0)
        return (*out, *grads)

    # Both sides run the same elementwise float32 recurrence; bf16 differs only in where
    # the kernel and the scan round their bf16 outputs.
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    for n, (a, b) in enumerate(zip(run("pallas"), run("scan"), strict=True)):
        assert rel_err(a.astype(jnp.float32), b.astype(jnp.float32)) <= tol, n

    token = [a[0, :2] for a in args]  # two tokens as a batch of two
    o, S = gated_delta_rule2_step(*token, h0[:2], backend="pallas")
    o_ref, S_ref = gated_delta_rule2_step(*token, h0[:2], backend="scan")
    assert rel_err(o.astype(jnp.float32), o_ref.astype(jnp.float32)) <= tol
    assert rel_err(S, S_ref) <= tol


def test_auto_on_a_gpu_runs_the_kernels_and_falls_back_where_they_cannot():
    x = make_inputs(55, Shape(B=1, T=70, H=2, K=64, V=64))
    args = [jnp.asarray(x[n]) for n in NAMES[:6]]
    state = jnp.asarray(x["initial_state"])
    token = [a[:, 0] for a in args]
    assert kernel_names(lambda *a: gated_delta_rule2(*a), *args)["gdn2_chunk_fwd_intra"] == 1
    assert kernel_names(lambda *a: gated_delta_rule2_recurrent(*a), *args) == {
        "gdn2_recurrent_fwd": 1
    }
    assert kernel_names(lambda *a: gated_delta_rule2_step(*a, state), *token) == {
        "gdn2_recurrent_fwd": 1
    }
    wide = make_inputs(56, Shape(B=1, T=70, H=2, K=64, V=512))
    wide_args = [jnp.asarray(wide[n]) for n in NAMES[:6]]
    assert kernel_names(lambda *a: gated_delta_rule2(*a), *wide_args) == {}
    o, _ = gated_delta_rule2(*wide_args)
    o_ref, _ = gated_delta_rule2(*wide_args, backend="scan")
    # xla's TF32 matmuls on the GPU against the scan's elementwise float32.
    assert rel_err(o, o_ref) <= 1e-2
    with pytest.raises(NotImplementedError, match="V=512"):
        gated_delta_rule2(*wide_args, backend="pallas")
