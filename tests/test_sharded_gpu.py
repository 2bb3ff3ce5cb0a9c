"""The GDN-2 op and the train step on 2 GPUs against one GPU, and the profiler's communication
time on GPU traces (benchmarks/collectives.py, read by bench_scaling.py).

    python -m pytest -m gpu tests/test_sharded_gpu.py      # a machine with >= 2 GPUs

`gdn2_jax.ops.sharded` runs the Pallas kernels per shard inside shard_map; with rows (the "data"
axis) or heads (the "tensor" axis) split over 2 GPUs each GPU runs the kernels on its own rows
or heads, so forward and every gradient must equal the one-GPU op's; with tokens split (the
"context" axis) each GPU runs its span and the spans' states are composed.
"""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from testing import kernel_names, rel_err

from gdn2_jax import ops, sharding
from gdn2_jax.config import MeshConfig
from gdn2_jax.ops import sharded

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import collectives

NUM_GPUS = jax.device_count() if jax.default_backend() == "gpu" else 0
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(NUM_GPUS == 0, reason="needs a GPU visible to JAX"),
]
two_gpus = pytest.mark.skipif(NUM_GPUS < 2, reason=f"needs 2 GPUs, {NUM_GPUS} visible")

MESHES = {
    "batch": MeshConfig(data=2),
    "heads": MeshConfig(data=1, tensor=2),
    "context": MeshConfig(data=1, context=2),
}
# Rows and heads never mix in the recurrence: each shard runs the same kernels on its own rows
# or heads with a smaller launch grid, the same blocks in the same order, so the results should
# be the one-GPU results; 1e-5 leaves room for float32 rounding and nothing else.
SPLIT_TOL = 1e-5
# Tokens split: each GPU runs the kernels on its span (TF32 products, about 3e-4 relative each,
# paper D.4) and the span states compose in float32, so rounding differs from one GPU's run;
# 2e-3 is the bound tests/test_layers_gpu.py holds TF32 kernels to over a few hundred tokens.
# (Not yet measured on 2 GPUs: no multi-GPU machine was lent when this was written.)
CONTEXT_TOL = 2e-3
# The train step on 2 GPUs: float32 matmuls multiply in TF32 there (XLA's default precision),
# and split matmuls and gradient sums add in another order, so rounding of about TF32's 3e-4
# per product remains in loss and gradients; Adam's first update is ~sign(gradient), so the
# parameters differ only where a near-zero gradient leaf flips. Not yet measured on 2 GPUs.
TRAIN_TOL = 1e-3
# B = 2 rows, T = 320 tokens (5 chunks, 160 per span at context = 2), H = 4, K = V = 64.
SHAPE = (2, 320, 4, 64)


def _inputs():
    keys = jax.random.split(jax.random.key(0), 7)
    q, k, v, f, b, w = (jax.random.normal(key, SHAPE, jnp.float32) for key in keys[:6])
    h0 = jax.random.normal(keys[6], (SHAPE[0], SHAPE[2], SHAPE[3], SHAPE[3]), jnp.float32)
    return (q, k, v, -jax.nn.softplus(f), jax.nn.sigmoid(b), jax.nn.sigmoid(w), h0)


def _loss_and_grads(op):
    """o, final state and the gradients of a random projection of both in all 7 inputs."""
    cot_o, cot_s = (jax.random.normal(jax.random.key(9 + i), s) for i, s in
                    enumerate([SHAPE, (SHAPE[0], SHAPE[2], SHAPE[3], SHAPE[3])]))  # fmt: skip

    def loss(q, k, v, g, b, w, h0):
        o, s = op(q, k, v, g, b, w, initial_state=h0, output_final_state=True,
                  use_qk_l2norm=True, backend="pallas")  # fmt: skip
        return jnp.sum(o * cot_o) + jnp.sum(s * cot_s), (o, s)

    return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(7)), has_aux=True))


@two_gpus
@pytest.mark.parametrize("split", list(MESHES))
def test_sharded_op_equals_one_gpu(split):
    args = _inputs()
    single = jax.device_put(args, jax.devices()[0])
    (_, (want_o, want_s)), want_grads = _loss_and_grads(ops.gated_delta_rule2)(*single)
    mesh = sharding.make_mesh(MESHES[split], devices=jax.devices()[:2])
    fn = _loss_and_grads(sharded.gated_delta_rule2)
    with jax.set_mesh(mesh):
        kernels = kernel_names(fn, *args)
        program = str(jax.make_jaxpr(fn)(*args))
        (_, (o, s)), grads = fn(*args)
    assert "shard_map" in program
    assert kernels["gdn2_chunk_fwd_intra"] >= 1, kernels
    tol = CONTEXT_TOL if split == "context" else SPLIT_TOL
    assert rel_err(o, want_o) < tol and rel_err(s, want_s) < tol
    for name, got, want in zip(["q", "k", "v", "g", "b", "w", "h0"], grads, want_grads,
                               strict=True):  # fmt: skip
        assert rel_err(got, want) < tol, name


@two_gpus
@pytest.mark.parametrize("layout", ["fsdp", "fsdp_tensor", "context"])
def test_train_step_on_two_gpus_equals_one_gpu(layout):
    """Two train steps of the tiny GDN-2 + sliding-window model (Pallas kernels, float32) on 2
    GPUs against 1: losses, every gradient and every parameter after the steps."""
    pytest.importorskip("grain", reason="the train step's data pipeline needs grain")
    from test_scaling import step_errors

    errors = step_errors(layout, 2, "model.gdn2_backend=pallas", "model.chunk_size=64")
    # The two steps move the parameters by 7.5e-3 (relative; measured on a CPU).
    assert errors["params_moved"] > 5 * TRAIN_TOL, errors
    for name in ("loss", "grads", "params"):
        assert errors[name] < TRAIN_TOL, (name, errors)


def _trace(fn, *args):
    jax.block_until_ready(fn(*args))
    with collectives.traced() as trace:
        jax.block_until_ready(fn(*args))
    return collectives.communication_ns(trace[0])


def test_trace_of_a_local_program_has_device_ops_and_no_communication():
    x = jnp.ones((2048, 2048), jnp.float32)
    totals = _trace(jax.jit(lambda x: jnp.tanh(x @ x)), x)
    # The GPU plane is found and read (the kernel lines exist), and nothing in it communicates.
    assert len(totals) >= 1 and all(v == 0 for v in totals.values()), totals


@two_gpus
def test_trace_of_an_all_reduce_has_communication():
    mesh = jax.make_mesh((2,), ("d",), devices=jax.devices()[:2])
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
    x = jax.device_put(jnp.ones((2, 4096, 4096), jnp.float32), spec)
    out = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    totals = _trace(jax.jit(lambda x: jnp.sum(x, axis=0), out_shardings=out), x)
    assert len(totals) == 2 and all(v > 0 for v in totals.values()), totals
