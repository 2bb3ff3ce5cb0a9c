"""Context parallelism: one sequence split over a "context" mesh axis equals the single device.

Every case runs in one child process with 8 virtual CPU devices (JAX fixes the device count when
it starts) and reports relative errors ‖a − b‖ / ‖b‖ of the forward and of every gradient against
the single-device op or module on the whole sequence.
"""

import json
import sys

import numpy as np
import pytest
from train_testing import run_python

# The context path runs the same float32 op on shorter spans (other chunk alignments, sums in
# another order) and composes span states with float32 matmuls: float32 rounding, amplified by at
# most a few chunk-level state passes. Measured: ≤ 2.1e-6 (extreme gates), ≤ 4.1e-7 otherwise.
OP_TOL = 1e-5
# The layer helpers give XLA the same float32 products, softmax over a longer (masked) key axis
# and sums over devices for parameter gradients: rounding only. Measured: ≤ 3e-7.
LAYER_TOL = 1e-5

OP_CASES = (
    "dense/context2/xla",
    "dense/context8/xla/extreme",
    "dense/context4/scan/no_initial_state",
    "packed/context8/xla/extreme",
    "packed/context4/scan",
    "batch/context2xdata2",
    "heads/context4xtensor2/l2norm_scale",
)
LAYER_CASES = (
    "conv/context2",
    "conv/context4/short_span",
    "conv/context4/no_segments",
    "conv/global/context4xtensor2",
    "swa/context2",
    "swa/context4/short_span",
    "swa/global/context2xtensor2",
    "full/context2",
    "full/context4",
    "full/global/context4xtensor2/no_segments",
    "segment_starts/context4",
)


@pytest.fixture(scope="module")
def errors():
    child = run_python([__file__, "child"], num_cpu_devices=8, timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    return json.loads(child.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", OP_CASES)
def test_op_equals_single_device(errors, case):
    # The final state and the gradients of q, k, v, g, b, w and initial_state are all checked.
    names = {"o", "final_state", "dq", "dk", "dv", "dg", "db", "dw"}
    if "no_initial_state" not in case:
        names.add("dinitial_state")
    assert set(errors[case]) == names
    assert max(errors[case].values()) < OP_TOL, errors[case]


def test_poisoned_sequence_stays_in_its_sequence_across_devices(errors):
    # A NaN in the packed sequence [10, 50), which runs through three of four spans: every other
    # sequence (the one after it on its last span included) equals the single device, forward and
    # backward, and the bad sequence is NaN from its first span on.
    errs = errors["packed/context4/scan/nan_in_one_sequence"]
    assert errs.pop("bad_sequence_not_all_nan") == 0.0
    assert max(errs.values()) < OP_TOL, errs


@pytest.mark.parametrize("case", LAYER_CASES)
def test_layer_helper_equals_single_device(errors, case):
    assert errors[case], case
    assert max(errors[case].values()) < LAYER_TOL, errors[case]


# ---------------------------------------------------------------- child process (8 devices)

PACKED_CU_SEQLENS = (0, 0, 10, 10, 50, 72, 73, 96, 96)  # empty at 0, 10 and T; 72 = 3·24 = 6·12
BAD_SEQUENCE = 3  # [10, 50): spans 0, 1 and 2 of four, followed by [50, 72) on span 2


def _mesh(**axes):
    import jax

    n = int(np.prod(list(axes.values())))
    auto = (jax.sharding.AxisType.Auto,) * len(axes)
    return jax.make_mesh(tuple(axes.values()), tuple(axes), auto, devices=jax.devices()[:n])


def _forward_and_grads(fn, inputs, cotangents, **kwargs):
    import jax
    import jax.numpy as jnp

    from gdn2_jax.crosscheck import NAMES

    names = [n for n in NAMES if inputs[n] is not None]

    def run(*arrays):
        named = dict(zip(names, arrays, strict=True))
        return fn(
            *(named[n] for n in NAMES[:6]),
            initial_state=named.get("initial_state"),
            output_final_state=True,
            **kwargs,
        )

    (o, S), vjp = jax.vjp(jax.jit(run), *(jnp.asarray(inputs[n]) for n in names))
    grads = vjp(tuple(jnp.asarray(c) for c in cotangents))
    return {"o": o, "final_state": S} | {f"d{n}": d for n, d in zip(names, grads, strict=True)}


def _op_case(
    mesh,
    *,
    packed=False,
    extreme=False,
    with_h0=True,
    B=2,
    abstract_mesh=False,
    poison=False,
    **kwargs,
):
    """Errors of the context-parallel op against `gated_delta_rule2` on the whole sequence; with
    `abstract_mesh` the op finds the mesh set by `jax.set_mesh`, else it is passed the mesh; with
    `poison` a NaN in BAD_SEQUENCE, and the errors on the other sequences."""
    import contextlib

    import jax
    import jax.numpy as jnp

    from gdn2_jax.crosscheck import Shape, make_cotangents, make_inputs, rel_err
    from gdn2_jax.ops import gated_delta_rule2
    from gdn2_jax.ops.context import context_parallel_gated_delta_rule2

    shape = Shape(B=1 if packed else B, T=96, H=2 if "head_axes" not in kwargs else 4, K=16, V=8)
    inputs = make_inputs(len(kwargs), shape, extreme=extreme, with_h0=with_h0)
    n_states = None
    if packed:
        n_states = len(PACKED_CU_SEQLENS) - 1
        rng = np.random.default_rng(7)
        h0 = rng.standard_normal((n_states, shape.H, shape.K, shape.V))
        inputs["initial_state"] = h0.astype(np.float32)
        kwargs["cu_seqlens"] = jnp.asarray(PACKED_CU_SEQLENS, jnp.int32)
    if poison:
        inputs["v"][0, 20, 0, 0] = np.nan  # in BAD_SEQUENCE, on span 0
    cotangents = make_cotangents(3, shape, n_states)
    op_kw = {n: kwargs.pop(n) for n in ("backend", "cu_seqlens", "use_qk_l2norm", "scale")
             if n in kwargs}  # fmt: skip
    op_kw["chunk_size"] = 16
    want = _forward_and_grads(gated_delta_rule2, inputs, cotangents, **op_kw)

    def context_op(*args, **kw):
        given = None if abstract_mesh else mesh
        return context_parallel_gated_delta_rule2(*args, mesh=given, **kwargs, **kw)

    with jax.set_mesh(mesh) if abstract_mesh else contextlib.nullcontext():
        got = _forward_and_grads(context_op, inputs, cotangents, **op_kw)
    if poison:
        return _poison_errors(got, want)
    return {name: rel_err(got[name], want[name]) for name in want}


def _poison_errors(got, want):
    """Errors on the good sequences only, and whether the bad one is all NaN."""
    from gdn2_jax.crosscheck import rel_err

    lo, hi = PACKED_CU_SEQLENS[BAD_SEQUENCE], PACKED_CU_SEQLENS[BAD_SEQUENCE + 1]
    good_tokens = np.r_[0:lo, hi : PACKED_CU_SEQLENS[-1]]
    good_states = [n for n in range(len(PACKED_CU_SEQLENS) - 1) if n != BAD_SEQUENCE]
    errs = {}
    for name in want:
        per_state = name in ("final_state", "dinitial_state")
        pick = (lambda a: np.asarray(a)[good_states]) if per_state else (
            lambda a: np.asarray(a)[:, good_tokens]
        )  # fmt: skip
        errs[name] = rel_err(pick(got[name]), pick(want[name]))
    bad = np.asarray(got["o"])[:, lo:hi]
    return errs | {"bad_sequence_not_all_nan": float(not np.isnan(bad).all())}


def _op_cases():
    xla, scan = {"backend": "xla"}, {"backend": "scan"}
    l2 = {"use_qk_l2norm": True, "scale": 0.3}
    return {
        "dense/context2/xla": lambda: _op_case(_mesh(context=2), **xla),
        "dense/context8/xla/extreme": lambda: _op_case(_mesh(context=8), extreme=True, **xla),
        "dense/context4/scan/no_initial_state": lambda: _op_case(
            _mesh(context=4), with_h0=False, **scan
        ),
        "packed/context8/xla/extreme": lambda: _op_case(
            _mesh(context=8), packed=True, extreme=True, **xla
        ),
        "packed/context4/scan": lambda: _op_case(_mesh(context=4), packed=True, **scan),
        "packed/context4/scan/nan_in_one_sequence": lambda: _op_case(
            _mesh(context=4), packed=True, poison=True, **scan
        ),
        "batch/context2xdata2": lambda: _op_case(
            _mesh(data=2, context=2), B=4, batch_axes=("data",), abstract_mesh=True, **xla
        ),
        "heads/context4xtensor2/l2norm_scale": lambda: _op_case(
            _mesh(context=4, tensor=2), head_axes=("tensor",), **xla, **l2
        ),
    }


def _layer_errors(make, mesh, T, context_fn, *, with_segments=True, output=None):
    """Errors of y and of the gradients of x and every parameter: `context_fn(module, x, ids,
    mesh)` on global arrays against `module(x)` (its element `output` if given)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from gdn2_jax.crosscheck import rel_err

    graphdef, params = nnx.split(make())
    rng = np.random.default_rng(T)
    x = jnp.asarray(rng.standard_normal((2, T, 16)), jnp.float32)
    # Random documents (mean length ~3), many of them crossing device boundaries.
    ids = jnp.asarray(np.cumsum(rng.random((2, T)) < 0.3, axis=1), jnp.int32)
    ids = ids if with_segments else None
    dy = jnp.asarray(rng.standard_normal((2, T, 16)), jnp.float32)

    def single(params, x):
        y = nnx.merge(graphdef, params)(x, segment_ids=ids)
        return y if output is None else y[output]

    def split(params, x):
        return context_fn(nnx.merge(graphdef, params), x, ids, mesh)

    want, want_vjp = jax.vjp(single, params, x)
    got, got_vjp = jax.vjp(jax.jit(split), params, x)
    (want_dp, want_dx), (got_dp, got_dx) = want_vjp(dy), got_vjp(dy)
    errs = {"y": rel_err(got, want), "dx": rel_err(got_dx, want_dx)}
    leaves = zip(jax.tree.leaves(got_dp), jax.tree.leaves(want_dp), strict=True)
    return errs | {"dparams": max(rel_err(a, b) for a, b in leaves)}


def _in_shard_map(span_fn):
    """A context_fn running `span_fn(module, x_local, segment_ids=...)` under shard_map over
    "context", the parameters replicated."""
    import jax
    from flax import nnx
    from jax.sharding import PartitionSpec as P

    def run(module, x, ids, mesh):
        graphdef, params = nnx.split(module)

        def local(params, x, ids):
            y = span_fn(nnx.merge(graphdef, params), x, segment_ids=ids)
            return y[0] if isinstance(y, tuple) else y

        ids_spec = None if ids is None else P(None, "context")
        return jax.shard_map(
            local, mesh=mesh, in_specs=(P(), P(None, "context", None), ids_spec),
            out_specs=P(None, "context", None), check_vma=False,
        )(params, x, ids)  # fmt: skip

    return run


def _segment_starts_error(mesh, T):
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    from gdn2_jax.layers import context

    rng = np.random.default_rng(1)
    ids = jnp.asarray(np.cumsum(rng.random((2, T)) < 0.3, axis=1), jnp.int32)
    previous = jnp.pad(ids[:, :-1], ((0, 0), (1, 0)))
    want = (ids != previous) | (jnp.arange(T) == 0)
    split = jax.shard_map(
        context.segment_starts, mesh=mesh, in_specs=P(None, "context"),
        out_specs=P(None, "context"), check_vma=False,
    )  # fmt: skip
    return {"mismatches": float(np.sum(np.asarray(split(ids)) != np.asarray(want)))}


def _layer_cases():
    from flax import nnx

    from gdn2_jax.layers import context
    from gdn2_jax.layers.attention import Attention
    from gdn2_jax.layers.conv import ShortConvolution

    def conv():
        return ShortConvolution(16, 4, rngs=nnx.Rngs(0))

    def attn(window):
        return lambda: Attention(16, 4, num_kv_heads=2, window_size=window, rngs=nnx.Rngs(0))

    def conv_wrapper(module, x, ids, mesh):
        return context.context_parallel_short_conv(
            module, x, segment_ids=ids, mesh=mesh, channel_axes=("tensor",)
        )

    def attn_wrapper(module, x, ids, mesh):
        return context.context_parallel_attention(
            module, x, segment_ids=ids, mesh=mesh, head_axes=("tensor",)
        )

    conv_span, attn_span = _in_shard_map(context.short_conv), _in_shard_map(context.attention)
    two, four = _mesh(context=2), _mesh(context=4)
    # T = 8 on 4 devices: spans of 2 tokens, shorter than the conv's 3-token and SWA's 4-token halo.
    return {
        "conv/context2": lambda: _layer_errors(conv, two, 16, conv_span, output=0),
        "conv/context4/short_span": lambda: _layer_errors(conv, four, 8, conv_span, output=0),
        "conv/context4/no_segments": lambda: _layer_errors(
            conv, four, 8, conv_span, with_segments=False, output=0
        ),
        "conv/global/context4xtensor2": lambda: _layer_errors(
            conv, _mesh(context=4, tensor=2), 8, conv_wrapper, output=0
        ),
        "swa/context2": lambda: _layer_errors(attn(5), two, 16, attn_span),
        "swa/context4/short_span": lambda: _layer_errors(attn(5), four, 8, attn_span),
        "swa/global/context2xtensor2": lambda: _layer_errors(
            attn(5), _mesh(context=2, tensor=2), 16, attn_wrapper
        ),
        "full/context2": lambda: _layer_errors(attn(None), two, 16, attn_span),
        "full/context4": lambda: _layer_errors(attn(None), four, 8, attn_span),
        "full/global/context4xtensor2/no_segments": lambda: _layer_errors(
            attn(None), _mesh(context=4, tensor=2), 8, attn_wrapper, with_segments=False
        ),
        "segment_starts/context4": lambda: _segment_starts_error(four, 8),
    }


def _run_cases():
    """Every case's errors; each case's time on stderr."""
    import time

    results = {}
    for name, case in (_op_cases() | _layer_cases()).items():
        start = time.perf_counter()
        results[name] = case()
        print(f"{name}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return results


if __name__ == "__main__" and sys.argv[1] == "child":
    print(json.dumps(_run_cases()))
