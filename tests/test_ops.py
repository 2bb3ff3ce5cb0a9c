"""The op's shared suite for the backends that run everywhere, plus backend-independent checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from op_testing import OpBackendTests

from gdn2_jax.crosscheck import NAMES, Shape, make_inputs, rel_err
from gdn2_jax.ops import gated_delta_rule2, gated_delta_rule2_recurrent, gated_delta_rule2_step


class TestScanBackend(OpBackendTests):
    backend = "scan"


class TestXlaBackend(OpBackendTests):
    backend = "xla"


def test_step_equals_recurrence():
    x = make_inputs(20, Shape(T=37))
    o_ref, S_ref = gated_delta_rule2_recurrent(
        *(jnp.asarray(x[n]) for n in NAMES[:6]),
        initial_state=jnp.asarray(x["initial_state"]),
        output_final_state=True,
    )
    S = jnp.asarray(x["initial_state"])
    step = jax.jit(gated_delta_rule2_step)
    outputs = []
    for t in range(37):
        o_t, S = step(*(jnp.asarray(x[n][:, t]) for n in NAMES[:6]), S)
        outputs.append(o_t)
    assert rel_err(jnp.stack(outputs, axis=1), o_ref) <= 1e-6
    assert rel_err(S, S_ref) <= 1e-6


def test_unknown_backend_raises():
    x = make_inputs(22, Shape(T=8))
    with pytest.raises(ValueError, match="backend"):
        gated_delta_rule2(*(jnp.asarray(x[n]) for n in NAMES[:6]), backend="cuda")


@pytest.fixture
def small():
    x = make_inputs(23, Shape(B=2, T=10, H=2, K=16, V=8))
    return [jnp.asarray(x[n]) for n in NAMES[:6]]


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda a: a.__setitem__(1, a[1][:, :, :, :8]), r"k has shape \(2, 10, 2, 8\)"),
        (lambda a: a.__setitem__(2, a[2][:, :5]), r"v has shape \(2, 5, 2, 8\)"),
        (lambda a: a.__setitem__(5, a[5][..., :4]), r"w has shape \(2, 10, 2, 4\)"),
        (lambda a: a.__setitem__(3, a[3][0]), r"g must be \[B, T, H, K\]-shaped"),
        (lambda a: a.__setitem__(0, a[0].astype(jnp.int32)), "q must have a floating dtype"),
    ],
)
def test_bad_inputs_raise_value_error(small, mutate, match):
    mutate(small)
    with pytest.raises(ValueError, match=match):
        gated_delta_rule2(*small)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(initial_state=jnp.zeros((3, 2, 16, 8))), r"initial_state has shape \(3, 2, 16, 8\)"),
        (dict(cu_seqlens=jnp.array([0, 10], jnp.int32)), "cu_seqlens requires batch size 1"),
        (dict(chunk_size=48), "chunk_size must be a power of two"),
    ],
)
def test_bad_arguments_raise_value_error(small, kwargs, match):
    with pytest.raises(ValueError, match=match):
        gated_delta_rule2(*small, **kwargs)


def test_bad_cu_seqlens_raise_value_error(small):
    packed = [a[:1] for a in small]
    for cu, match in [
        ([0, 6, 4, 10], "non-decreasing"),
        ([0, 4, 9], "end at T=10"),
        ([1, 4, 10], "start at 0"),
    ]:
        with pytest.raises(ValueError, match=match):
            gated_delta_rule2(*packed, cu_seqlens=jnp.array(cu, jnp.int32))
    with pytest.raises(ValueError, match="integer dtype"):
        gated_delta_rule2(*packed, cu_seqlens=jnp.array([0.0, 10.0]))


def test_step_bad_state_raises(small):
    tokens = [a[:, 0] for a in small]
    with pytest.raises(ValueError, match="state has shape"):
        gated_delta_rule2_step(*tokens, jnp.zeros((2, 2, 8, 8)))


@pytest.mark.parametrize("packed", [False, True])
def test_custom_vjp_matches_autodiff_of_scan_in_float64(packed):
    """The hand-written chunk backward against jax.grad through the token-serial scan, in float64,
    where both are exact to rounding: any missing or mis-gated term shows far above 1e-10."""
    cu = np.array([0, 50, 50, 130], np.int32) if packed else None
    shape = Shape(B=1 if packed else 2, T=130)
    n_states = 3 if packed else 2
    with jax.enable_x64(True):
        x = make_inputs(30, shape, extreme=True, with_h0=False)
        x["initial_state"] = make_inputs(31, Shape(B=n_states, T=1))["initial_state"]
        args = [jnp.asarray(x[n], jnp.float64) for n in NAMES]
        rng = np.random.default_rng(32)
        do = jnp.asarray(rng.standard_normal((shape.B, shape.T, shape.H, shape.V)))
        dS = jnp.asarray(rng.standard_normal((n_states, shape.H, shape.K, shape.V)))

        def loss(backend):
            def f(args):
                o, S = gated_delta_rule2(
                    *args[:6],
                    initial_state=args[6],
                    output_final_state=True,
                    cu_seqlens=cu,
                    backend=backend,
                )
                return jnp.sum(o * do) + jnp.sum(S * dS)

            return f

        reference = jax.grad(loss("scan"))(args)
        chunked = jax.grad(loss("xla"))(args)
    for name, a, b in zip(NAMES, chunked, reference, strict=True):
        assert a.dtype == jnp.float64
        assert rel_err(a, b) <= 1e-10, name


def _grad_temp_bytes(shape):
    x = make_inputs(33, shape)
    args = [jnp.asarray(x[n]) for n in NAMES[:6]]

    def loss(args):
        o, _ = gated_delta_rule2(*args, backend="xla")
        return jnp.sum(o)

    return jax.jit(jax.grad(loss)).lower(args).compile().memory_analysis().temp_size_in_bytes


def test_chunk_backward_keeps_no_per_token_states():
    """Storing a state per token would cost T·K·V floats, so widening V by 128 would add
    T·K·128 floats of temporaries. Per-chunk states and O(T·(K+V)) activations add far less."""
    narrow = _grad_temp_bytes(Shape(B=1, T=1024, H=1, K=64, V=128))
    wide = _grad_temp_bytes(Shape(B=1, T=1024, H=1, K=64, V=256))
    per_token_growth = 1024 * 64 * 128 * 4
    assert wide - narrow < per_token_growth / 4, f"{(wide - narrow) / 2**20:.1f} MiB"


@pytest.mark.parametrize("T", [40, 64])
def test_single_chunk_forward_is_right_in_every_fresh_compile(T):
    """A one-chunk input without initial state, jitted: jaxlib 0.11.2's CPU compiler once turned
    the matmul against the constant zero state into garbage in about half of fresh compiles."""
    x = make_inputs(9, Shape(B=2, T=T, H=2, K=32, V=32), with_h0=False)
    args = [jnp.asarray(x[n]) for n in NAMES[:6]]
    o_ref = gated_delta_rule2(*args, use_qk_l2norm=True, backend="scan")[0]
    for _ in range(6):
        jax.clear_caches()
        fwd = jax.jit(lambda *a: gated_delta_rule2(*a, use_qk_l2norm=True, backend="xla")[0])
        assert rel_err(fwd(*args), o_ref) <= 1e-4
