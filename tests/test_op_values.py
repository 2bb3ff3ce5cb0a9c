"""Values that break the op's math, per backend: g = -inf is an exact hard reset; g > 0, NaN or inf
inputs and bad cu_seqlens raise ValueError outside jit, fail a checkify check under jit with
check_values=True, and otherwise turn exactly the sequences they affect (outputs, final states
and every input gradient) into NaN while every other sequence is computed as without them.

Each backend compiles one packed function (forward and VJP, cu_seqlens traced) and one checkified
forward, and runs every case through them, so the cases cost executions, not compiles. Packed
sequences share one batch row, the harder case for isolation; dense batch rows are checked on the
scan, XLA and token-serial backends (the Pallas chunk kernels run rows as separate programs, and
their interpret-mode compile is the most expensive, so they get the packed case only).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

from gdn2_jax.crosscheck import NAMES, Shape, make_cotangents, make_inputs, rel_err, torch_reference
from gdn2_jax.ops import gated_delta_rule2, gated_delta_rule2_recurrent, gated_delta_rule2_step

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

DENSE = Shape(B=2, T=40, H=1, K=16, V=16)
PACKED = Shape(B=1, T=100, H=1, K=16, V=16)
# Sequence 0 spans two 64-token chunks and holds the hard resets; the bad values go in sequence 1.
CU = np.array([0, 70, 85, 100], np.int32)
BAD_SEQ = slice(70, 85)
GOOD_SEQS = (slice(0, 70), slice(85, 100))
# (argument, how it is made bad, the error it must give)
BAD_VALUES = [
    ("q", np.nan, "q must be finite"),
    ("k", np.inf, "k must be finite"),
    ("v", np.nan, "v must be finite"),
    ("g", np.nan, r"g must be <= 0 and not NaN"),
    ("g", 0.5, r"g must be <= 0 and not NaN"),
    ("b", -np.inf, "b must be finite"),
    ("w", np.nan, "w must be finite"),
    ("initial_state", np.inf, "initial_state must be finite"),
]
BAD_CU = [
    ([0, 85, 70, 100], "non-decreasing"),
    ([2, 70, 85, 100], "start at 0"),
    ([0, 70, 85, 90], "end at T=100"),
]


def _op(backend, interpret, form, *args, **kwargs):
    fn = gated_delta_rule2 if form == "chunk" else gated_delta_rule2_recurrent
    return fn(*args, backend=backend, interpret=interpret, output_final_state=True, **kwargs)


@functools.cache
def _forward_and_vjp(backend, interpret, form, packed):
    """jit of (o, final_state, grads of q..w and initial_state) for given cotangents."""

    def run(tensors, h0, cotangents, cu_seqlens):
        def op(tensors, h0):
            return _op(backend, interpret, form, *tensors, initial_state=h0, cu_seqlens=cu_seqlens)

        (o, S), vjp = jax.vjp(op, tensors, h0)
        d_tensors, dh0 = vjp(cotangents)
        return o, S, (*d_tensors, dh0)

    if packed:
        return jax.jit(run)
    return jax.jit(lambda tensors, h0, cotangents: run(tensors, h0, cotangents, None))


def _arrays(x):
    return [jnp.asarray(x[n]) for n in NAMES[:6]], jnp.asarray(x["initial_state"])


def _as_numpy(result):
    o, S, grads = result
    return np.asarray(o), np.asarray(S), dict(zip(NAMES, map(np.asarray, grads), strict=True))


def _with_hard_resets(g, row, offset=0):
    """Hard resets (g = -inf) in batch row `row`: every channel at token offset + 5, channels
    3..8 at offset + 17 and channel 0 at offset + 33."""
    g[row, offset + 5] = -np.inf
    g[row, offset + 17, :, 3:9] = -np.inf
    g[row, offset + 33, :, 0] = -np.inf


def _dense_inputs():
    """Row 0 with hard resets; row 1 with a NaN in v and a g > 0 (and a clean copy of it)."""
    x = make_inputs(50, DENSE)
    _with_hard_resets(x["g"], 0)
    clean = {n: a.copy() for n, a in x.items()}
    x["v"][1, 20, 0, 3] = np.nan
    x["g"][1, 12, 0, 4] = 0.5
    return x, clean


def assert_matches_fla(x, cotangents, o, S, grads, fwd_tol, grad_tol):
    """o, S and every gradient against fla's naive recurrence on the same (sliced) arrays."""
    o_ref, S_ref, g_ref = torch_reference(x, cotangents)
    assert np.isfinite(o).all() and np.isfinite(S).all()
    assert rel_err(o[:, :5], o_ref[:, :5]) <= fwd_tol, "tokens before the first reset"
    assert rel_err(o, o_ref) <= fwd_tol
    assert rel_err(S, S_ref) <= fwd_tol
    for name, grad in grads.items():
        assert np.isfinite(grad).all(), name
        assert rel_err(grad, g_ref[name]) <= grad_tol, name


class DenseValueTests:
    """g = -inf and row poisoning; subclasses set backend, interpret and form."""

    backend = ""
    interpret = False
    form = "chunk"
    # float32 against fla's float32 recurrence: rounding over T steps, summed in another order
    # by the chunk forms (as tests/op_testing.py).
    FWD_TOL = 1e-4
    GRAD_TOL = 1e-3

    @pytest.fixture(scope="class")
    def dense(self):
        x, clean = _dense_inputs()
        cotangents = make_cotangents(50, DENSE)
        run = _forward_and_vjp(self.backend, self.interpret, self.form, packed=False)
        cot = tuple(map(jnp.asarray, cotangents))
        bad = _as_numpy(run(*_arrays(x), cot))
        without_bad_rows = _as_numpy(run(*_arrays(clean), cot))
        return x, cotangents, bad, without_bad_rows

    def test_minus_inf_log_decay_is_an_exact_hard_reset(self, dense):
        x, cotangents, (o, S, grads), _ = dense
        row0 = {n: a[:1] for n, a in x.items()}
        grads = {n: d[:1] for n, d in grads.items()}
        cot = tuple(c[:1] for c in cotangents)
        assert_matches_fla(row0, cot, o[:1], S[:1], grads, self.FWD_TOL, self.GRAD_TOL)

    def test_bad_values_poison_only_their_row(self, dense):
        _, _, (o, S, grads), (o_clean, S_clean, grads_clean) = dense
        assert np.isnan(o[1]).all() and np.isnan(S[1]).all()
        for name, grad in grads.items():
            assert np.isnan(grad[1]).all(), f"d{name} of row 1"
        np.testing.assert_array_equal(o[0], o_clean[0])
        np.testing.assert_array_equal(S[0], S_clean[0])
        for name in grads:
            np.testing.assert_array_equal(grads[name][0], grads_clean[name][0], err_msg=name)


def _packed_inputs():
    """Three packed sequences; sequence 0 has hard resets."""
    x = make_inputs(51, PACKED, with_h0=False)
    x["initial_state"] = make_inputs(52, Shape(B=3, T=1, H=1, K=16, V=16))["initial_state"]
    _with_hard_resets(x["g"], 0, offset=20)
    return x


def _make_bad(x, name, value):
    """A copy of x with one bad value in packed sequence 1."""
    x = {n: a.copy() for n, a in x.items()}
    if name == "initial_state":
        x[name][1, 0, 2, 3] = value
    else:
        x[name][0, 75, 0, 2] = value
    return x


class PackedValueTests:
    """Bad values with packed sequences: outside jit, under checkify, poisoned under jit."""

    backend = ""
    interpret = False

    def op(self, *args, **kwargs):
        return _op(self.backend, self.interpret, "chunk", *args, **kwargs)

    @pytest.mark.parametrize(("name", "value", "match"), BAD_VALUES)
    def test_bad_value_raises_outside_jit(self, name, value, match):
        tensors, h0 = _arrays(_make_bad(_packed_inputs(), name, value))
        with pytest.raises(ValueError, match=match):
            self.op(*tensors, initial_state=h0, cu_seqlens=jnp.asarray(CU))

    def test_bad_cu_seqlens_raise_outside_jit(self):
        tensors, h0 = _arrays(_packed_inputs())
        for cu, match in [*BAD_CU, ([0.0, 10.0, 30.0, 48.0], "integer dtype")]:
            with pytest.raises(ValueError, match=match):
                self.op(*tensors, initial_state=h0, cu_seqlens=jnp.asarray(cu))

    def test_checkify_reports_bad_values_under_jit(self):
        def run(tensors, h0, cu_seqlens):
            return self.op(*tensors, initial_state=h0, cu_seqlens=cu_seqlens, check_values=True)

        checked = jax.jit(checkify.checkify(run))
        x = _packed_inputs()
        err, (o, _) = checked(*_arrays(x), jnp.asarray(CU))
        assert err.get() is None and np.isfinite(np.asarray(o)).all()
        cases = [(_make_bad(x, n, v), CU, m) for n, v, m in BAD_VALUES]
        cases += [(x, np.array(cu, np.int32), m) for cu, m in BAD_CU]
        for inputs, cu, match in cases:
            err, (o, _) = checked(*_arrays(inputs), jnp.asarray(cu))
            with pytest.raises(checkify.JaxRuntimeError, match=match):
                err.throw()
            assert np.isnan(np.asarray(o)).any(), "the outputs are poisoned as well"

    FWD_TOL = DenseValueTests.FWD_TOL
    GRAD_TOL = DenseValueTests.GRAD_TOL
    COTANGENTS = make_cotangents(51, PACKED, n_states=3)

    @pytest.fixture(scope="class")
    def packed_run(self):
        run = _forward_and_vjp(self.backend, self.interpret, "chunk", packed=True)
        cot = tuple(map(jnp.asarray, self.COTANGENTS))
        return lambda x, cu: _as_numpy(run(*_arrays(x), cot, jnp.asarray(cu)))

    def test_minus_inf_log_decay_is_an_exact_hard_reset(self, packed_run):
        x = _packed_inputs()
        o, S, grads = packed_run(x, CU)
        seq0 = slice(0, 70)
        x0 = {n: a[:1] if n == "initial_state" else a[:, seq0] for n, a in x.items()}
        cot = (self.COTANGENTS[0][:, seq0], self.COTANGENTS[1][:1])
        grads = {n: d[:1] if n == "initial_state" else d[:, seq0] for n, d in grads.items()}
        assert_matches_fla(x0, cot, o[:, seq0], S[:1], grads, self.FWD_TOL, self.GRAD_TOL)

    def test_bad_values_under_jit_poison_only_their_sequence(self, packed_run):
        x = _packed_inputs()
        o_clean, S_clean, grads_clean = packed_run(x, CU)
        assert np.isfinite(o_clean).all() and np.isfinite(S_clean).all()
        for name, value, _ in BAD_VALUES:
            o, S, grads = packed_run(_make_bad(x, name, value), CU)
            case = f"{name} = {value}"
            assert np.isnan(o[:, BAD_SEQ]).all() and np.isnan(S[1]).all(), case
            assert np.isnan(grads["initial_state"][1]).all(), case
            for n in NAMES[:6]:
                assert np.isnan(grads[n][:, BAD_SEQ]).all(), f"d{n} for {case}"
            for seq in GOOD_SEQS:
                np.testing.assert_array_equal(o[:, seq], o_clean[:, seq], err_msg=case)
                for n in NAMES[:6]:
                    np.testing.assert_array_equal(grads[n][:, seq], grads_clean[n][:, seq])
            for n in (0, 2):
                np.testing.assert_array_equal(S[n], S_clean[n], err_msg=case)
                np.testing.assert_array_equal(
                    grads["initial_state"][n], grads_clean["initial_state"][n], err_msg=case
                )

    def test_bad_cu_seqlens_under_jit_poison_every_sequence(self, packed_run):
        x = _packed_inputs()
        for cu, _ in BAD_CU:
            o, S, grads = packed_run(x, np.array(cu, np.int32))
            assert np.isnan(o).all() and np.isnan(S).all(), cu
            for name, grad in grads.items():
                assert np.isnan(grad).all(), f"d{name} for cu_seqlens {cu}"


class TestScanDense(DenseValueTests):
    backend = "scan"


class TestXlaDense(DenseValueTests):
    backend = "xla"


class TestPallasTokenSerialDense(DenseValueTests):
    """The token-serial kernel (decoding, short prefills); its gradient is the scan's VJP."""

    backend = "pallas"
    interpret = True
    form = "recurrent"


class TestScanPacked(PackedValueTests):
    backend = "scan"


class TestXlaPacked(PackedValueTests):
    backend = "xla"


class TestPallasPacked(PackedValueTests):
    backend = "pallas"
    interpret = True


def _step_inputs():
    x = make_inputs(53, Shape(B=2, T=1, H=1, K=16, V=16))
    return [jnp.asarray(x[n][:, 0]) for n in NAMES[:6]], jnp.asarray(x["initial_state"])


def test_step_bad_values_raise_outside_jit():
    tokens, state = _step_inputs()
    tokens[3] = tokens[3].at[1, 0, 2].set(0.5)
    with pytest.raises(ValueError, match=r"g must be <= 0 and not NaN .*: g\[1, 0, 2\] = 0.5"):
        gated_delta_rule2_step(*tokens, state, backend="scan")
    with pytest.raises(ValueError, match="state must be finite"):
        gated_delta_rule2_step(*_step_inputs()[0], state.at[0, 0, 0, 0].set(jnp.nan))


def test_step_bad_values_under_jit_poison_only_their_row():
    tokens, state = _step_inputs()
    step = jax.jit(functools.partial(gated_delta_rule2_step, backend="scan"))
    o_clean, S_clean = step(*tokens, state)
    tokens[1] = tokens[1].at[1, 0, 2].set(jnp.nan)
    o, S = step(*tokens, state)
    assert np.isnan(np.asarray(o[1])).all() and np.isnan(np.asarray(S[1])).all()
    np.testing.assert_array_equal(o[0], o_clean[0])
    np.testing.assert_array_equal(S[0], S_clean[0])


def test_bad_constant_under_jit_raises_while_tracing():
    """Arrays a jitted function closes over are concrete: checked at trace time, on device."""
    tensors, h0 = _arrays(_make_bad(_packed_inputs(), "w", np.nan))
    run = jax.jit(lambda: gated_delta_rule2(*tensors, initial_state=h0, cu_seqlens=CU))
    with pytest.raises(ValueError, match=r"w must be finite \(no NaN or inf\): w\[0, 75, 0, 2\]"):
        run()
