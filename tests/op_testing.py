"""Shared machinery for testing every backend of the GDN-2 op against fla's PyTorch reference.

`OpBackendTests` holds the whole op test suite; each backend subclasses it and sets `backend`
(and `interpret` for the Pallas kernels in interpret mode), tokamax style. Ground truth is
fla-core's `naive_recurrent_gdn2` (token-by-token, PyTorch).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule
from fla.ops.gdn2.naive import naive_recurrent_gdn2
from fla.ops.kda.naive import naive_recurrent_kda

from gdn2_jax.crosscheck import (
    NAMES,
    Shape,
    jax_forward_and_grads,
    make_cotangents,
    make_inputs,
    rel_err,
    torch_reference,
)
from gdn2_jax.ops import gated_delta_rule, gated_delta_rule2, kda


class OpBackendTests:
    """The op's test suite; subclasses set `backend`. Tolerances carry their reasons."""

    backend: str = ""
    interpret: bool = False

    # float32 against float32: both sides accumulate rounding over T steps; the chunk form sums
    # in another order, so agreement is to a few ulps times the sequence length.
    FWD_TOL = 1e-4
    GRAD_TOL = 1e-3

    def op(self, *args, **kwargs):
        return gated_delta_rule2(*args, backend=self.backend, interpret=self.interpret, **kwargs)

    def check_against_fla(self, inputs, shape, fwd_tol=None, grad_tol=None):
        cotangents = make_cotangents(0, shape)
        o_ref, S_ref, g_ref = torch_reference(inputs, cotangents)
        o, S, grads = jax_forward_and_grads(inputs, cotangents, fn=self.op)
        errors = {"o": rel_err(o, o_ref), "final_state": rel_err(S, S_ref)}
        errors |= {f"d{n}": rel_err(grads[n], g_ref[n]) for n in grads}
        for name, err in errors.items():
            tol = (fwd_tol or self.FWD_TOL) if name in ("o", "final_state") else grad_tol
            assert err <= (tol or self.GRAD_TOL), f"{self.backend} {name}: rel err {err:.2e}"
        return errors

    @pytest.mark.parametrize("T", [63, 100, 130])
    @pytest.mark.parametrize("with_h0", [True, False])
    def test_matches_fla_naive(self, T, with_h0):
        shape = Shape(T=T)
        self.check_against_fla(make_inputs(T, shape, with_h0=with_h0), shape)

    def test_extreme_gates_finite_and_exact(self):
        shape = Shape(T=130)
        inputs = make_inputs(7, shape, extreme=True)
        assert inputs["g"].min() < -20
        self.check_against_fla(inputs, shape)

    def test_strong_decay_whole_chunk(self):
        # g ≈ −5 on every token: a 64-token chunk reaches G ≈ −320, where exp(−G) overflows.
        shape = Shape(T=130)
        inputs = make_inputs(8, shape, g_scale=5.0)
        self.check_against_fla(inputs, shape)

    def test_packed_sequences_match_separate_runs(self):
        # An empty sequence (17, 17) and lengths that are not chunk multiples.
        cu = np.array([0, 17, 17, 90, 150], np.int32)
        shape = Shape(B=1, T=150)
        inputs = make_inputs(3, shape, with_h0=False)
        inputs["initial_state"] = make_inputs(4, Shape(B=4, T=1))["initial_state"]
        cotangents = make_cotangents(3, shape, n_states=4)
        o_ref, S_ref, g_ref = torch_reference(inputs, cotangents, reference=packed_reference(cu))
        o, S, grads = jax_forward_and_grads(
            inputs, cotangents, fn=self.op, cu_seqlens=jnp.asarray(cu)
        )
        assert rel_err(o, o_ref) <= self.FWD_TOL
        assert rel_err(S, S_ref) <= self.FWD_TOL
        for name in grads:
            assert rel_err(grads[name], g_ref[name]) <= self.GRAD_TOL, name

    def test_packed_sequences_under_jit(self):
        cu = np.array([0, 40, 70, 70], np.int32)
        shape = Shape(B=1, T=70)
        x = make_inputs(5, shape, with_h0=False)
        args = [jnp.asarray(x[n]) for n in NAMES[:6]]

        def run(cu_seqlens):
            return self.op(*args, cu_seqlens=cu_seqlens, output_final_state=True)

        eager = run(jnp.asarray(cu))
        jitted = jax.jit(run)(jnp.asarray(cu))
        for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
            assert rel_err(a, b) <= 1e-6
        assert np.all(np.asarray(eager[1][2]) == 0), "an empty sequence keeps its (zero) state"

    def test_nan_stays_in_its_sequence(self):
        # A NaN in one packed sequence (or batch row) must not reach any other one, forward or
        # backward: resets and chunk padding must cut every path between sequences.
        cu = np.array([0, 30, 70, 100], np.int32)
        x = make_inputs(6, Shape(B=1, T=100), with_h0=False)
        x["v"][0, 50, 0, 0] = np.nan
        args = [jnp.asarray(x[n]) for n in NAMES[:6]]

        def loss(args):
            o, _ = self.op(*args, cu_seqlens=jnp.asarray(cu))
            return jnp.sum(jnp.where(jnp.isnan(o), 0.0, o) ** 2), o

        grads, o = jax.grad(loss, has_aux=True)(args)
        o = np.asarray(o)
        assert np.isfinite(o[:, :30]).all() and np.isfinite(o[:, 70:]).all()
        assert np.isnan(o[:, 50:70]).any(), "the poisoned sequence itself must show the NaN"
        for grad in grads:
            grad = np.asarray(grad)
            assert np.isfinite(grad[:, :30]).all() and np.isfinite(grad[:, 70:]).all()

    def check_tied_reduction(self, ours, reference, seed, per_head_decay):
        """A tied-gate entry point against fla's own naive recurrence for that model."""
        x = make_inputs(seed, Shape(T=100))
        rng = np.random.default_rng(seed)
        beta = rng.uniform(0.05, 1.0, (2, 100, 2)).astype(np.float32)
        g = -rng.uniform(0.0, 1.0, (2, 100, 2)).astype(np.float32) if per_head_decay else x["g"]
        o_ref, S_ref = reference(
            *(torch.tensor(x[n]) for n in "qkv"),
            g=torch.tensor(g),
            beta=torch.tensor(beta),
            initial_state=torch.tensor(x["initial_state"]),
            output_final_state=True,
        )
        o, S = ours(
            *(jnp.asarray(x[n]) for n in "qkv"),
            jnp.asarray(g),
            jnp.asarray(beta),
            initial_state=jnp.asarray(x["initial_state"]),
            output_final_state=True,
            backend=self.backend,
            interpret=self.interpret,
        )
        assert rel_err(o, o_ref.numpy()) <= self.FWD_TOL
        assert rel_err(S, S_ref.numpy()) <= self.FWD_TOL

    def test_kda_reduction_matches_fla(self):
        self.check_tied_reduction(kda, naive_recurrent_kda, 9, per_head_decay=False)

    def test_gated_delta_rule_reduction_matches_fla(self):
        self.check_tied_reduction(
            gated_delta_rule, naive_recurrent_gated_delta_rule, 10, per_head_decay=True
        )

    def test_l2norm_and_scale_match_fla(self):
        shape = Shape(T=63, K=16, V=32)
        x = make_inputs(11, shape)
        x["q"] *= 3.0
        x["k"] *= 0.5  # un-normalized: the op's l2norm must do the work
        cotangents = make_cotangents(11, shape)

        def reference(q, k, *rest, **kwargs):
            return naive_recurrent_gdn2(
                torch_l2norm(q), torch_l2norm(k), *rest, scale=0.7, **kwargs
            )

        o_ref, S_ref, g_ref = torch_reference(x, cotangents, reference=reference)
        o, S, grads = jax_forward_and_grads(
            x, cotangents, fn=self.op, use_qk_l2norm=True, scale=0.7
        )
        assert rel_err(o, o_ref) <= self.FWD_TOL and rel_err(S, S_ref) <= self.FWD_TOL
        for name in grads:
            assert rel_err(grads[name], g_ref[name]) <= self.GRAD_TOL, name

    def test_bfloat16_close_to_float32_reference(self):
        shape = Shape(T=100)
        x = make_inputs(12, shape)
        o_ref, S_ref, _ = torch_reference(x, make_cotangents(12, shape))
        bf16 = {n: jnp.asarray(a, jnp.bfloat16) for n, a in x.items() if n not in ("g",)}
        o, S = self.op(
            *(bf16[n] for n in "qkv"),
            jnp.asarray(x["g"]),
            bf16["b"],
            bf16["w"],
            initial_state=jnp.asarray(x["initial_state"]),
            output_final_state=True,
        )
        assert o.dtype == jnp.bfloat16 and S.dtype == jnp.float32
        # bfloat16 keeps 8 mantissa bits (≈ 4e-3 per rounding); inputs and output are rounded.
        assert rel_err(o.astype(jnp.float32), o_ref) <= 2e-2
        assert rel_err(S, S_ref) <= 2e-2

    def test_bfloat16_gradients_have_input_dtypes(self):
        x = make_inputs(13, Shape(T=40))
        args = [jnp.asarray(x[n], jnp.float32 if n == "g" else jnp.bfloat16) for n in NAMES[:6]]
        h0 = jnp.asarray(x["initial_state"])

        def loss(args, h0):
            o, S = self.op(*args, initial_state=h0, output_final_state=True)
            return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(S**2)

        grads, dh0 = jax.grad(loss, argnums=(0, 1))(args, h0)
        assert [d.dtype for d in grads] == [a.dtype for a in args]
        assert dh0.dtype == jnp.float32
        assert all(bool(jnp.isfinite(d.astype(jnp.float32)).all()) for d in (*grads, dh0))

    def test_jit_matches_eager(self):
        x = make_inputs(14, Shape(T=70))
        args = [jnp.asarray(x[n]) for n in NAMES[:6]]
        kwargs = dict(initial_state=jnp.asarray(x["initial_state"]), output_final_state=True)
        eager = self.op(*args, **kwargs)
        jitted = jax.jit(lambda *a: self.op(*a, **kwargs))(*args)
        for a, b in zip(eager, jitted, strict=True):
            assert rel_err(a, b) <= 1e-6


def torch_l2norm(x, eps=1e-6):
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def packed_reference(cu):
    """fla's naive recurrence run per packed sequence (B = 1), each with its own state."""

    def reference(q, k, v, g, b, w, *, initial_state, output_final_state):
        del output_final_state
        outputs, finals = [], []
        for n in range(len(cu) - 1):
            lo, hi = int(cu[n]), int(cu[n + 1])
            h0 = initial_state[n : n + 1]
            if hi == lo:
                outputs.append(v[:, lo:hi]), finals.append(h0)
                continue
            o, S = naive_recurrent_gdn2(
                *(x[:, lo:hi] for x in (q, k, v, g, b, w)),
                initial_state=h0,
                output_final_state=True,
            )
            outputs.append(o), finals.append(S)
        return torch.cat(outputs, dim=1), torch.cat(finals, dim=0)

    return reference
