"""Context parallelism for the GDN-2 op: one sequence split along its tokens over a mesh axis.

Over a span of tokens the recurrence is affine in the state entering the span:

    S_end = P S_begin + R,     P = Π_t (I − k_t (b_t ⊙ k_t)ᵀ) Diag(exp(g_t)),  R = S_end from 0.

Each device runs the op twice on its own span, both from its local tokens only:
  * the value run (v, w from a zero state) gives o⁰ and R;
  * the transition run (v = 0 from the identity, a value axis of size K) gives o' = Pₜᵀ(scale·qₜ)
    and P, where Pₜ is the product up to token t.
The two runs share q, k, g, b and are independent across value columns, so they are exactly the
op with the value axis [v | 0] and initial state [0 | I]; they are two calls so that each keeps
the op's value width (the Pallas kernels take V ≤ 128). An exclusive scan of the (P, R) pairs over
the context axis gives every device the state C entering its span, and since o is linear in the
state, o = o⁰ + o' C: no third run from C is needed. Autodiff through the two runs (the op's
custom_vjp), the scan's ppermutes and the final combination gives exact gradients.

Packed sequences (cu_seqlens, B = 1, global boundaries): only the sequence that contains the span's
first token (n*) can continue from the previous device, and only if it began before the span.
The transition run covers n*'s first local segment only (two local segments, from I and from 0),
so o' vanishes past it and the span's P is zero unless n* runs through the whole span. Every other
sequence restarts from its own initial state in the value run.
"""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from gdn2_jax.ops import values
from gdn2_jax.ops.api import gated_delta_rule2
from gdn2_jax.ops.checks import check_inputs
from gdn2_jax.ops.decay import HIGHEST


def _mm(spec, *xs):
    return jnp.einsum(spec, *xs, precision=HIGHEST)


def _apply(P, S):
    """P S per (batch, head): P [B, H, K, K], S [B, H, K, V]."""
    return _mm("bhij,bhjv->bhiv", P, S)


def _shift(x, axis_name, n, by):
    """x from the device `by` places earlier on the axis; zeros on the first `by` devices."""
    return jax.lax.ppermute(x, axis_name, [(i, i + by) for i in range(n - by)])


def _carry(P, S, cut):
    """P S, exactly 0 where the map is `cut` ([B, H]: P = 0, a sequence ends inside the span or
    its state was reset), so that the NaN state of a poisoned sequence stops where that sequence
    ends: 0 · NaN would be NaN. Selecting on both sides keeps the cotangents clean as well."""
    cut = cut[..., None, None]
    return jnp.where(cut, 0.0, _apply(P, jnp.where(cut, 0.0, S)))


def incoming_states(P, R, C0, axis_name):
    """The state entering each device's span, and the one leaving it.

    Span d maps its entering state C_d to C_{d+1} = P_d C_d + R_d, with C_0 = C0. Device 0 folds C0
    into its map (P = 0, R = P_0 C0 + R_0); then a Hillis–Steele scan composes each device's map
    with its predecessors' in ⌈log₂ N⌉ ppermute rounds, after which every map is constant: its R is
    the state leaving the span. One more shift gives the entering one. The last round only needs
    R, so it sends R alone. Memory and traffic are O(K·K + K·V) per head, whatever N.
    """
    n = jax.lax.axis_size(axis_name)
    first = jax.lax.axis_index(axis_name) == 0
    R = jnp.where(first, _apply(P, C0) + R, R)
    P = jnp.where(first, jnp.zeros_like(P), P)
    cut = jnp.all(P == 0, axis=(-2, -1))
    by = 1
    while by < n:
        R_lo = _shift(R, axis_name, n, by)  # zeros where there is no predecessor: R stays
        if 2 * by < n:
            has_lo = jax.lax.axis_index(axis_name) >= by
            P_lo = _shift(P, axis_name, n, by)
            cut_lo = _shift(cut.astype(jnp.int32), axis_name, n, by) > 0
            R = _carry(P, R_lo, cut) + R
            P = jnp.where(has_lo, _mm("bhij,bhjk->bhik", P, P_lo), P)
            cut = jnp.where(has_lo, cut | cut_lo, cut)
        else:
            R = _carry(P, R_lo, cut) + R
        by *= 2
    if n == 1:
        return C0, R
    return jnp.where(first, C0, _shift(R, axis_name, n, 1)), R


def _identity_states(n, shape, dtype):
    """n copies of the identity as [n, H, K, K] states."""
    H, K = shape[2], shape[3]
    return jnp.broadcast_to(jnp.eye(K, dtype=dtype), (n, H, K, K))


def _dense_span(q, k, v, g, b, w, initial_state, op_kw):
    """(o⁰, o', P, R, C0) of a span of dense rows: both runs over the whole span."""
    o0, R = gated_delta_rule2(q, k, v, g, b, w, output_final_state=True, **op_kw)
    zeros = jnp.zeros(k.shape, v.dtype)
    eye = _identity_states(q.shape[0], q.shape, jnp.float32)
    o1, P = gated_delta_rule2(
        q, k, zeros, g, b, zeros, initial_state=eye, output_final_state=True, **op_kw
    )
    C0 = jnp.zeros_like(R) if initial_state is None else initial_state.astype(R.dtype)
    return o0, o1, P, R, C0


class PackedSpan:
    """Where the global sequence boundaries fall relative to this device's span [start, end)."""

    def __init__(self, cu_seqlens, T_local, axis_name):
        cu = cu_seqlens.astype(jnp.int32)
        self.n = cu.shape[0] - 1
        self.start = jax.lax.axis_index(axis_name) * T_local
        end = self.start + T_local
        ends = cu[1:]
        # n*: the sequence holding the span's first token; a: the one holding its last token.
        self.n_star = jnp.minimum(jnp.searchsorted(ends, self.start, side="right"), self.n - 1)
        self.a = jnp.minimum(jnp.searchsorted(ends, end - 1, side="right"), self.n - 1)
        self.continued = cu[self.n_star] < self.start
        self.local_cu = jnp.clip(cu - self.start, 0, T_local)
        # n*'s first local segment is [0, first_end).
        self.first_end = self.local_cu[self.n_star + 1]
        self.T_local = T_local
        last_token = jnp.clip(ends - 1, 0, jax.lax.axis_size(axis_name) * T_local - 1)
        self.owned = last_token // T_local == jax.lax.axis_index(axis_name)  # [N] final states


def _packed_span(q, k, v, g, b, w, initial_state, span: PackedSpan, op_kw):
    """(o⁰, o', P, R, finals⁰, P_seg) of a packed span: sequence-local value run, n*-only
    transition run. finals⁰ are the value run's per-sequence final states (n* from zero when it
    continues), P_seg the transition over n*'s first local segment (zero unless it continues)."""
    h0 = initial_state
    if h0 is not None:
        continuing = (jnp.arange(span.n) == span.n_star) & span.continued
        h0 = jnp.where(continuing[:, None, None, None], 0.0, h0)
    o0, finals0 = gated_delta_rule2(
        q, k, v, g, b, w, initial_state=h0, cu_seqlens=span.local_cu, output_final_state=True,
        **op_kw,
    )  # fmt: skip
    zeros = jnp.zeros(k.shape, v.dtype)
    eye = _identity_states(1, q.shape, jnp.float32) * span.continued
    segments = jnp.stack([0, span.first_end, span.T_local]).astype(jnp.int32)
    o1, P_segs = gated_delta_rule2(
        q, k, zeros, g, b, zeros, initial_state=jnp.concatenate([eye, jnp.zeros_like(eye)]),
        cu_seqlens=segments, output_final_state=True, **op_kw,
    )  # fmt: skip
    P_seg = P_segs[:1]
    P = jnp.where(span.first_end == span.T_local, P_seg, 0.0)
    R = jax.lax.dynamic_slice_in_dim(finals0, span.a, 1)
    return o0, o1, P, R, finals0, P_seg


def _packed_finals(finals0, P_seg, C, span: PackedSpan, axis_name):
    """Every sequence's final state on every device: each is kept by the device that holds the
    sequence's last token (an empty one by the device holding the token before it, whose value
    run returns its initial state), the others contribute zeros to one psum."""
    is_n_star = ((jnp.arange(span.n) == span.n_star) & span.continued)[:, None, None, None]
    # A sequence starting this span has P_seg = 0; the selects keep a NaN C (the previous,
    # poisoned sequence's) out of its final state.
    carried = _apply(P_seg, jnp.where(span.continued, C, 0.0))
    finals = finals0 + jnp.where(is_n_star, carried, 0.0)
    return jax.lax.psum(jnp.where(span.owned[:, None, None, None], finals, 0.0), axis_name)


def gated_delta_rule2_context(
    q,
    k,
    v,
    g,
    b,
    w,
    *,
    axis_name="context",
    scale=None,
    initial_state=None,
    output_final_state=False,
    cu_seqlens=None,
    use_qk_l2norm=False,
    backend="auto",
    chunk_size=64,
    interpret=False,
    check_values=False,
):
    """`gated_delta_rule2` on this device's span of a sequence split over `axis_name`.

    Call inside `jax.shard_map` with the token axis of q, k, v, g, b, w ([B, T_local, H, *]) split
    evenly over `axis_name`: device d holds global tokens d·T_local … (d+1)·T_local − 1. The other
    arguments are the global ones, the same on every device of the axis: initial_state [N, H, K, V]
    (the state before global token 0, or per packed sequence), cu_seqlens [N+1] global packed
    boundaries (B = 1). Returns this span's o [B, T_local, H, V] and, with output_final_state, the
    global final state [N, H, K, V] on every device (else None). check_values as
    `gated_delta_rule2`, per span: a traced bad value poisons its sequence from this span on.
    """
    op_kw = dict(
        scale=scale, use_qk_l2norm=use_qk_l2norm, backend=backend, chunk_size=chunk_size,
        interpret=interpret, check_values=check_values,
    )  # fmt: skip
    if cu_seqlens is None:
        o0, o1, P, R, C0 = _dense_span(q, k, v, g, b, w, initial_state, op_kw)
        C, S_end = incoming_states(P, R, C0, axis_name)
    else:
        span = PackedSpan(cu_seqlens, q.shape[1], axis_name)
        o0, o1, P, R, finals0, P_seg = _packed_span(q, k, v, g, b, w, initial_state, span, op_kw)
        C, _ = incoming_states(P, R, jnp.zeros_like(R), axis_name)
    o1 = o1.astype(jnp.float32)
    if cu_seqlens is None:
        carried = _mm("bthk,bhkv->bthv", o1, C)
    else:
        # Only n*'s first segment sees C (o1 is exactly 0 past it). Selecting on both sides of
        # the product keeps a NaN in a poisoned sequence's C off the span's other sequences,
        # where 0 · NaN would reach their outputs (forward) and their o1 cotangents (backward).
        in_first = (jnp.arange(q.shape[1]) < span.first_end) & span.continued
        in_first = in_first[None, :, None, None]
        carried = _mm("bthk,bhkv->bthv", jnp.where(in_first, o1, 0.0), C)
        carried = jnp.where(in_first, carried, 0.0)
    o = o0.astype(jnp.float32) + carried
    final = None
    if output_final_state and cu_seqlens is None:
        last = jax.lax.axis_index(axis_name) == jax.lax.axis_size(axis_name) - 1
        final = jax.lax.psum(jnp.where(last, S_end, 0.0), axis_name)
    elif output_final_state:
        final = _packed_finals(finals0, P_seg, C, span, axis_name)
    return o.astype(v.dtype), final


def spec_axes(names):
    """A PartitionSpec entry for mesh axes `names`: None, one name, or a tuple of names."""
    names = tuple(names)
    return names if len(names) > 1 else (names[0] if names else None)


def context_parallel_gated_delta_rule2(
    q,
    k,
    v,
    g,
    b,
    w,
    *,
    mesh=None,
    context_axis="context",
    batch_axes=(),
    head_axes=(),
    scale=None,
    initial_state=None,
    output_final_state=False,
    cu_seqlens=None,
    use_qk_l2norm=False,
    backend="auto",
    chunk_size=64,
):
    """`gated_delta_rule2` on global arrays with the token axis split over `context_axis`.

    Runs `gated_delta_rule2_context` under `jax.shard_map` on `mesh` (default: the abstract mesh
    set with `jax.set_mesh`), composing with batch rows split over `batch_axes` and heads over
    `head_axes`. T must divide by the context axis size; packed sequences need B = 1 and no batch
    axes. Results as `gated_delta_rule2`.
    """
    check_inputs(q, k, v, g, b, w, initial_state=initial_state, cu_seqlens=cu_seqlens)
    values.raise_on_concrete(
        dict(zip("qkvgbw", (q, k, v, g, b, w), strict=True)),
        initial_state=initial_state,
        cu_seqlens=cu_seqlens,
        length=q.shape[1],
    )
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    n = mesh.shape[context_axis]
    if q.shape[1] % n:
        raise ValueError(f"T={q.shape[1]} must divide by the {context_axis!r} axis size {n}")
    if cu_seqlens is not None and batch_axes:
        raise ValueError(
            f"packed sequences (cu_seqlens) share one row; got batch_axes {batch_axes}"
        )
    batch, heads = spec_axes(batch_axes), spec_axes(head_axes)
    x_spec = PartitionSpec(batch, context_axis, heads, None)
    state_spec = PartitionSpec(batch, heads, None, None)
    given = {"initial_state": initial_state, "cu_seqlens": cu_seqlens}
    given = {name: x for name, x in given.items() if x is not None}
    given_specs = {"initial_state": state_spec, "cu_seqlens": PartitionSpec()}

    def local(q, k, v, g, b, w, given):
        return gated_delta_rule2_context(
            q, k, v, g, b, w, axis_name=context_axis, scale=scale,
            output_final_state=output_final_state, use_qk_l2norm=use_qk_l2norm,
            backend=backend, chunk_size=chunk_size, **given,
        )  # fmt: skip

    sharded = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=((x_spec,) * 6 + ({name: given_specs[name] for name in given},)),
        out_specs=(x_spec, state_spec if output_final_state else None),
        check_vma=False,
    )
    return sharded(q, k, v, g, b, w, given)
