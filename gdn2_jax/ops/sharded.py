"""The op's entry points run per shard under the active mesh.

The Pallas kernels have no partitioning rule, so under a mesh XLA would gather whole arrays onto
every device. Each shard holds whole sequences of some heads, and the recurrence is independent
across both, so the op runs locally inside `jax.shard_map` over the batch axes and the head
axis. Without a mesh, or with one that cannot split these shapes, each function is the op itself.
"""

import functools
import math

import jax
from jax.sharding import PartitionSpec

from gdn2_jax.ops import api

# Mesh axes that split the batch, and the one that splits heads (absent axes are skipped).
BATCH_AXES = ("data", "fsdp")
HEAD_AXES = ("tensor",)


def _axes_that_divide(mesh, axes, size):
    axes = tuple(a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1)
    if not axes or size % math.prod(mesh.shape[a] for a in axes):
        return None
    return axes


def _split(batch_size, num_heads, packed):
    """(batch axes, head axes) to split over, or None to run the op unsharded."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    # Packed sequences share batch row 0, so only heads can be split then.
    batch = None if packed else _axes_that_divide(mesh, BATCH_AXES, batch_size)
    heads = _axes_that_divide(mesh, HEAD_AXES, num_heads)
    return None if batch is None and heads is None else (batch, heads)


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


def _sequence(op, tensors, initial_state, cu_seqlens, output_final_state):
    q = tensors[0]
    split = _split(q.shape[0], q.shape[2], cu_seqlens is not None)
    if split is None:
        return op(*tensors, initial_state=initial_state, cu_seqlens=cu_seqlens)
    batch, heads = split
    x_spec = PartitionSpec(batch, None, heads, None)
    state_spec = PartitionSpec(batch, heads, None, None)
    return _per_shard(
        op,
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
):
    """`gdn2_jax.ops.gated_delta_rule2` per shard of the active mesh (same arguments)."""
    op = functools.partial(
        api.gated_delta_rule2,
        scale=scale,
        output_final_state=output_final_state,
        use_qk_l2norm=use_qk_l2norm,
        backend=backend,
        chunk_size=chunk_size,
        interpret=interpret,
    )
    return _sequence(op, (q, k, v, g, b, w), initial_state, cu_seqlens, output_final_state)


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
):
    """`gdn2_jax.ops.gated_delta_rule2_recurrent` per shard of the active mesh."""
    op = functools.partial(
        api.gated_delta_rule2_recurrent,
        scale=scale,
        output_final_state=output_final_state,
        use_qk_l2norm=use_qk_l2norm,
        backend=backend,
        interpret=interpret,
    )
    return _sequence(op, (q, k, v, g, b, w), initial_state, cu_seqlens, output_final_state)


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
):
    """`gdn2_jax.ops.gated_delta_rule2_step` per shard of the active mesh."""
    op = functools.partial(
        api.gated_delta_rule2_step,
        scale=scale,
        use_qk_l2norm=use_qk_l2norm,
        backend=backend,
        interpret=interpret,
    )
    tensors = (q_t, k_t, v_t, g_t, b_t, w_t)
    split = _split(q_t.shape[0], q_t.shape[1], packed=False)
    if split is None:
        return op(*tensors, state=state)
    batch, heads = split
    token_spec = PartitionSpec(batch, heads, None)
    state_spec = PartitionSpec(batch, heads, None, None)
    return _per_shard(
        op, tensors, {"state": state}, token_spec, {"state": state_spec}, (token_spec, state_spec)
    )
