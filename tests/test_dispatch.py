"""Which implementation runs: the kernels in the traced program for every backend name, "auto"
and its fallbacks, the errors for a backend that cannot run, and validated kernel configs.

On a CPU the Pallas kernels run only with interpret=True, which the tests pass explicitly.
"""

import jax
import jax.numpy as jnp
import pytest
from testing import kernel_names, rel_err

from gdn2_jax import options
from gdn2_jax.crosscheck import NAMES, Shape, make_inputs
from gdn2_jax.ops import (
    gated_delta_rule2,
    gated_delta_rule2_recurrent,
    gated_delta_rule2_step,
    registry,
)
from pallas_kernels import ChunkConfig, Launch, RecurrentConfig

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

CHUNK_FORWARD = {"gdn2_chunk_fwd_diag": 1, "gdn2_chunk_fwd_intra": 1, "gdn2_chunk_fwd_state": 1}
SERIAL = {"gdn2_recurrent_fwd": 1}
OFF_GPU = jax.default_backend() != "gpu"


def _args(T=40, K=16, V=32, dtype=jnp.float32, B=1):
    x = make_inputs(0, Shape(B=B, T=T, H=2, K=K, V=V))
    return [jnp.asarray(x[n], jnp.float32 if n == "g" else dtype) for n in NAMES[:6]]


def _chunk(**kw):
    return lambda *a: gated_delta_rule2(*a, **kw)


def _serial(**kw):
    return lambda *a: gated_delta_rule2_recurrent(*a, **kw)


def _step(**kw):
    def run(q, k, v, g, b, w):
        state = jnp.zeros((q.shape[0], q.shape[2], q.shape[3], v.shape[3]), jnp.float32)
        return gated_delta_rule2_step(
            q[:, 0], k[:, 0], v[:, 0], g[:, 0], b[:, 0], w[:, 0], state, **kw
        )

    return run


def test_registries_are_the_declared_names():
    assert registry.CHUNK.names == options.CHUNK_BACKENDS
    assert registry.RECURRENT.names == options.RECURRENT_BACKENDS


@pytest.mark.parametrize(
    ("fn", "expected"),
    [
        (_chunk(backend="pallas", interpret=True), CHUNK_FORWARD),
        (_chunk(backend="xla"), {}),
        (_chunk(backend="scan"), {}),
        (_serial(backend="pallas", interpret=True), SERIAL),
        (_serial(backend="scan"), {}),
        (_step(backend="pallas", interpret=True), SERIAL),
        (_step(backend="scan"), {}),
    ],
)
def test_the_named_backend_is_what_runs(fn, expected):
    assert kernel_names(fn, *_args()) == expected


def test_gradients_run_the_backward_kernels():
    def loss(*a):
        return jnp.sum(gated_delta_rule2(*a, backend="pallas", interpret=True)[0] ** 2)

    counts = kernel_names(jax.grad(loss, argnums=tuple(range(6))), *_args())
    assert counts == {
        "gdn2_chunk_fwd_diag": 1,
        "gdn2_chunk_fwd_intra": 1,
        "gdn2_chunk_fwd_state_save": 1,
        "gdn2_chunk_bwd_dstate": 1,
        "gdn2_chunk_bwd_wy": 1,
        "gdn2_chunk_bwd_diag": 1,
        "gdn2_chunk_bwd_intra": 1,
    }


@pytest.mark.skipif(not OFF_GPU, reason="on a GPU 'auto' takes the compiled kernels")
def test_auto_off_a_gpu_takes_xla_and_scan_unless_interpret_is_asked_for():
    args = _args()
    assert kernel_names(_chunk(), *args) == {}
    assert kernel_names(_serial(), *args) == {}
    assert kernel_names(_step(), *args) == {}
    assert kernel_names(_chunk(interpret=True), *args) == CHUNK_FORWARD
    assert kernel_names(_serial(interpret=True), *args) == SERIAL
    assert kernel_names(_step(interpret=True), *args) == SERIAL


@pytest.mark.skipif(not OFF_GPU, reason="on a GPU the kernels compile")
@pytest.mark.parametrize("fn", [_chunk, _serial, _step])
def test_pallas_off_a_gpu_without_interpret_raises(fn):
    with pytest.raises(NotImplementedError, match=r"need a GPU .* interpret=True"):
        fn(backend="pallas")(*_args())


# Inputs the Pallas kernels cannot run, and the reason the error must give.
UNSUPPORTED = {
    "chunk_size": (dict(chunk_size=32), dict(), "chunk_size=64, got 32"),
    "V=48": (dict(), dict(V=48), "V=48"),
    "V=512": (dict(), dict(V=512), "V=512"),
    "K=8": (dict(), dict(K=8), "K=8"),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_auto_falls_back_to_xla_where_pallas_cannot_run(case):
    op_kw, shape_kw, _ = UNSUPPORTED[case]
    args = _args(**shape_kw)
    assert kernel_names(_chunk(interpret=True, **op_kw), *args) == {}
    o_auto, _ = gated_delta_rule2(*args, interpret=True, **op_kw)
    o_scan, _ = gated_delta_rule2(*args, backend="scan")
    # The fallback ran a chunk algorithm (xla), compared with the token-serial reference.
    assert rel_err(o_auto, o_scan) <= 1e-5


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_pallas_asked_for_by_name_explains_why_it_cannot_run(case):
    op_kw, shape_kw, reason = UNSUPPORTED[case]
    with pytest.raises(NotImplementedError, match=reason):
        gated_delta_rule2(*_args(**shape_kw), backend="pallas", interpret=True, **op_kw)


@pytest.mark.parametrize("case", ["V=48", "K=8"])
def test_token_serial_auto_falls_back_to_scan(case):
    _, shape_kw, reason = UNSUPPORTED[case]
    args = _args(**shape_kw)
    assert kernel_names(_serial(interpret=True), *args) == {}
    assert kernel_names(_step(interpret=True), *args) == {}
    with pytest.raises(NotImplementedError, match=reason):
        _serial(backend="pallas", interpret=True)(*args)
    with pytest.raises(NotImplementedError, match=reason):
        _step(backend="pallas", interpret=True)(*args)


def test_float64_falls_back_and_pallas_refuses_it():
    with jax.enable_x64(True):
        args = _args(dtype=jnp.float64)
        assert kernel_names(_chunk(interpret=True), *args) == {}
        assert kernel_names(_serial(interpret=True), *args) == {}
        o, _ = gated_delta_rule2(*args, interpret=True)
        assert o.dtype == jnp.float64
        with pytest.raises(NotImplementedError, match="float64"):
            gated_delta_rule2(*args, backend="pallas", interpret=True)


@pytest.mark.parametrize("fn", [gated_delta_rule2, gated_delta_rule2_recurrent])
def test_unknown_backend_names_are_value_errors(fn):
    with pytest.raises(ValueError, match="backend must be one of"):
        fn(*_args(), backend="cuda")
    if fn is gated_delta_rule2_recurrent:
        with pytest.raises(ValueError, match="backend must be one of"):
            fn(*_args(), backend="xla")  # a chunk-form name


def test_shared_suite_subclass_runs_the_kernels():
    """The interpret-mode subclass of the shared op suite really runs the kernels."""
    from test_pallas import TestPallasBackend

    suite = TestPallasBackend()
    assert kernel_names(suite.op, *_args()) == CHUNK_FORWARD


# ---------------------------------------------------------------------------------------------
# Kernel configs


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: ChunkConfig(intra_block_k=48), "ChunkConfig.intra_block_k"),
        (lambda: ChunkConfig(state_block_v=48), "ChunkConfig.state_block_v"),
        (lambda: ChunkConfig(aux_block=8), "ChunkConfig.aux_block"),
        (lambda: ChunkConfig(wy_block_v=0), "ChunkConfig.wy_block_v"),
        (lambda: ChunkConfig(structure="fast"), "ChunkConfig.structure"),
        (lambda: ChunkConfig(diag_store="rows"), "ChunkConfig.diag_store"),
        (lambda: ChunkConfig(diag_inverse="neumann"), "ChunkConfig.diag_inverse"),
        (lambda: ChunkConfig(output_block_v=24), "ChunkConfig.output_block_v"),
        (lambda: RecurrentConfig(block_v=24), "RecurrentConfig.block_v"),
        (lambda: Launch(num_warps=3), "Launch.num_warps"),
        (lambda: Launch(num_stages=0), "Launch.num_stages"),
        (lambda: Launch(num_stages=2.5), "Launch.num_stages"),
    ],
)
def test_bad_kernel_configs_are_value_errors(make, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        make()


def test_tiles_must_divide_the_dimension_they_tile():
    cfg = ChunkConfig()
    cfg.check_dims(64, 128)
    with pytest.raises(ValueError, match=r"ChunkConfig\.intra_block_k=32 does not divide K=48"):
        cfg.check_dims(48, 64)
    with pytest.raises(ValueError, match=r"RecurrentConfig\.block_v=32 does not divide V=80"):
        RecurrentConfig().check_dims(16, 80)
