"""The op's entry points run per shard under the active mesh.

The Pallas kernels have no partitioning rule, so under a mesh XLA would gather whole arrays onto
every device. The recurrence is independent across sequences and heads, so the op runs locally
inside `jax.shard_map` over the batch axes and the head axis. A "context" axis of size > 1 splits
each sequence along its tokens; the op then runs `gated_delta_rule2_context`, which passes span
states between the devices of that axis. Without a mesh, or with one that cannot split these
shapes, each function is the op itself; a context axis of size 1 changes nothing.
"""

import functools
import math

import jax
from jax.sharding import PartitionSpec

from gdn2_jax.ops import api
from gdn2_jax.ops.context import gated_delta_rule2_context

# Mesh axes that split the batch, the one that splits tokens and the one that splits heads
# (absent axes, and axes of size 1, are skipped).
BATCH_AXES = ("data", "fsdp")
CONTEXT_AXIS = "context"
HEAD_AXES = ("tensor",)


def _axes_that_divide(mesh, axes, size):
    axes = tuple(a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1)
    if not axes or size % math.prod(mesh.shape[a] for a in axes):
        return None
    return axes


def mesh_axes(axes, size):
    """The active mesh's axes among `axes` (size > 1) if together they divide `size`, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else _axes_that_divide(mesh, axes, size)


def context_axis(num_tokens):
    """CONTEXT_AXIS when the active mesh splits a sequence of `num_tokens` over it, else None.

    Raises ValueError when the axis has size > 1 and does not divide the sequence: the spans of
    the context algorithms are equal by construction.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.shape.get(CONTEXT_AXIS, 1) == 1:
        return None
    size = mesh.shape[CONTEXT_AXIS]
    if num_tokens % size:
        raise ValueError(
            f"a sequence of {num_tokens} tokens does not split over the {CONTEXT_AXIS!r} mesh "
            f"axis of size {size}"
        )
    return CONTEXT_AXIS


def _split(batch_size, num_heads, num_tokens, packed):
    """(batch axes, context axis, head axes) to split over, or None to run the op unsharded.
    `num_tokens` is None where the token axis is not split (one-token decoding inputs, or whole
    sequences on each device)."""
    # Packed sequences share batch row 0, so only heads (and tokens) can be split then.
    batch = None if packed else mesh_axes(BATCH_AXES, batch_size)
    heads = mesh_axes(HEAD_AXES, num_heads)
    context = None if num_tokens is None else context_axis(num_tokens)
    return None if batch is None and heads is None and context is None else (batch, context, heads)


def _per_shard(op, tensors, optional, tensor_spec, optional_specs, out_specs):
    """shard_map of op(*tensors, **optional) where the optional arrays that are None stay out."""
    given = {name: x for name, x in optional.items() if x is not None}

    def local(tensors, given):
        return op(*tensors, **given)

    return jax.shard_map(
        local,
        in_specs=((tensor_spec,) * len(tensors), {n: optional_specs[n] for n in given}),
        out_specs=out_specs,
        check_vma=False,
    )(tensors, given)


def _sequence(op, context_op, tensors, initial_state, cu_seqlens, output_final_state, parallel):
    """`op` per shard, or `context_op` per span when `parallel` and the mesh splits the tokens
    over CONTEXT_AXIS (the initial and final states are then global: the same on every device of
    that axis). Without `parallel` every device of that axis runs whole sequences."""
    q = tensors[0]
    num_tokens = q.shape[1] if parallel else None
    split = _split(q.shape[0], q.shape[2], num_tokens, cu_seqlens is not None)
    if split is None:
        return op(*tensors, initial_state=initial_state, cu_seqlens=cu_seqlens)
    batch, context, heads = split
    if context is not None and context_op is None:
        raise NotImplementedError(
            f"{op.func.__name__} has no context-parallel form: split the tokens over "
            f"{CONTEXT_AXIS!r} with the chunk form (gated_delta_rule2), or run it on a mesh "
            f"whose {CONTEXT_AXIS!r} axis has size 1"
        )
    x_spec = PartitionSpec(batch, context, heads, None)
    state_spec = PartitionSpec(batch, heads, None, None)
    return _per_shard(
        op if context is None else context_op,
        tensors,
        {"initial_state": initial_state, "cu_seqlens": cu_seqlens},
        x_spec,
        {"initial_state": state_spec, "cu_seqlens": PartitionSpec()},
        (x_spec, state_spec if output_final_state else None),
    )


def gated_delta_rule2(
    q,
    k,
    v,
    g,
    b,
    w,
    *,
    scale=None,
    initial_state=None,
    output_final_state=False,
    cu_seqlens=None,
    use_qk_l2norm=False,
    backend="auto",
    chunk_size=64,
    interpret=False,
    check_values=False,
    context_parallel=True,
):
    """`gdn2_jax.ops.gated_delta_rule2` per shard of the active mesh (same arguments).

    With `context_parallel` a mesh axis CONTEXT_AXIS of size > 1 splits each sequence along its
    tokens (T must divide by its size); without it every device of that axis runs whole sequences.
    """
    options = dict(
        scale=scale,
        output_final_state=output_final_state,
        use_qk_l2norm=use_qk_l2norm,
        backend=backend,
        chunk_size=chunk_size,
        interpret=interpret,
        check_values=check_values,
    )
    op = functools.partial(api.gated_delta_rule2, **options)
    context_op = functools.partial(gated_delta_rule2_context, axis_name=CONTEXT_AXIS, **options)
    tensors = (q, k, v, g, b, w)
    return _sequence(
        op, context_op, tensors, initial_state, cu_seqlens, output_final_state, context_parallel
    )


def gated_delta_rule2_recurrent(
    q,
    k,
    v,
    g,
    b,
    w,
    *,
    scale=None,
    initial_state=None,
    output_final_state=False,
    cu_seqlens=None,
    use_qk_l2norm=False,
    backend="auto",
    interpret=False,
    check_values=False,
    context_parallel=True,
):
    """`gdn2_jax.ops.gated_delta_rule2_recurrent` per shard of the active mesh. The token-serial
    form has no context-parallel form: with `context_parallel` a mesh axis CONTEXT_AXIS of size > 1
    raises NotImplementedError; without it every device of that axis runs whole sequences."""
    op = functools.partial(
        api.gated_delta_rule2_recurrent,
        scale=scale,
        output_final_state=output_final_state,
        use_qk_l2norm=use_qk_l2norm,
        backend=backend,
        interpret=interpret,
        check_values=check_values,
    )
    tensors = (q, k, v, g, b, w)
    return _sequence(
        op, None, tensors, initial_state, cu_seqlens, output_final_state, context_parallel
    )


def gated_delta_rule2_step(
    q_t,
    k_t,
    v_t,
    g_t,
    b_t,
    w_t,
    state,
    *,
    scale=None,
    use_qk_l2norm=False,
    backend="auto",
    interpret=False,
    check_values=False,
):
    """`gdn2_jax.ops.gated_delta_rule2_step` per shard of the active mesh."""
    op = functools.partial(
        api.gated_delta_rule2_step,
        scale=scale,
        use_qk_l2norm=use_qk_l2norm,
        backend=backend,
        interpret=interpret,
        check_values=check_values,
    )
    tensors = (q_t, k_t, v_t, g_t, b_t, w_t)
    split = _split(q_t.shape[0], q_t.shape[1], None, packed=False)
    if split is None:
        return op(*tensors, state=state)
    batch, _, heads = split
    token_spec = PartitionSpec(batch, heads, None)
    state_spec = PartitionSpec(batch, heads, None, None)
    return _per_shard(
        op, tensors, {"state": state}, token_spec, {"state": state_spec}, (token_spec, state_spec)
    )
