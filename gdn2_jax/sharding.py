"""Device mesh, logical-axis rules and batch shardings of training.

Mesh axes: "data" and "fsdp" both split the batch ("fsdp" also splits parameters along the
model width), "context" splits each sequence along its tokens (parameters are replicated over
it), "tensor" splits heads, MLP width and vocabulary. The GDN-2 op runs per shard over the same
axes (`gdn2_jax.ops.sharded`).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from gdn2_jax.config import MeshConfig
from gdn2_jax.ops.sharded import BATCH_AXES, CONTEXT_AXIS, HEAD_AXES

MESH_AXES = (*BATCH_AXES, CONTEXT_AXIS, *HEAD_AXES)

# Logical axis names (from the model's nnx.with_partitioning annotations) -> mesh axes.
LOGICAL_RULES = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("conv", None),
)


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, ...]:
    # MeshConfig has checked the sizes (each >= 1 or -1, at most one -1) when it was built.
    sizes = [getattr(cfg, axis) for axis in MESH_AXES]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"mesh {sizes}: {num_devices} devices do not divide by {known}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {math.prod(sizes)} devices, "
            f"have {num_devices}"
        )
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices=None) -> jax.sharding.Mesh:
    devices = jax.devices() if devices is None else devices
    # Auto axes: shardings are chosen by the compiler from the constraints we give (GSPMD).
    return jax.make_mesh(
        mesh_shape(cfg, len(devices)),
        MESH_AXES,
        (AxisType.Auto,) * len(MESH_AXES),
        devices=devices,
    )


def _fit(spec: PartitionSpec, shape: tuple[int, ...], mesh) -> PartitionSpec:
    """Drops mesh axes from dims they do not divide (e.g. a 4-head layer on 8-way tensor)."""
    dims = []
    for size, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        while names and size % math.prod(mesh.shape[a] for a in names):
            names = names[:-1]
        dims.append(names if len(names) > 1 else (names[0] if names else None))
    return PartitionSpec(*dims)


def param_shardings(abstract_state: nnx.State, mesh) -> dict:
    """NamedShardings (as a pure dict) for the parameters of an abstract model state."""
    with nnx.logical_axis_rules(LOGICAL_RULES):
        specs = nnx.to_pure_dict(nnx.get_partition_spec(abstract_state))
    shapes = nnx.to_pure_dict(abstract_state)
    return jax.tree.map(
        lambda spec, x: NamedSharding(mesh, _fit(spec, x.shape, mesh)),
        specs,
        shapes,
        is_leaf=lambda s: isinstance(s, PartitionSpec),
    )


def context_size(mesh) -> int:
    """Devices each sequence is split over (1 for a mesh without a context axis)."""
    return mesh.shape.get(CONTEXT_AXIS, 1)


def batch_spec(mesh) -> PartitionSpec:
    """Batch arrays [B, T]: rows over the batch axes, tokens over "context" when it splits them
    (a context axis of size 1 leaves the spec, hence the program, as without one)."""
    if context_size(mesh) > 1:
        return PartitionSpec(BATCH_AXES, CONTEXT_AXIS)
    return PartitionSpec(BATCH_AXES)


def batch_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, batch_spec(mesh))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_context_within_hosts(mesh) -> None:
    """Each host loads whole sequences of its own rows, so the devices that share a sequence
    (one line along the context axis) must belong to one process."""
    if context_size(mesh) == 1 or jax.process_count() == 1:
        return
    along = np.moveaxis(mesh.devices, mesh.axis_names.index(CONTEXT_AXIS), -1)
    process = np.vectorize(lambda d: d.process_index)(along)
    if np.any(process != process[..., :1]):
        raise ValueError(
            f"mesh.context={context_size(mesh)} spans several hosts; each sequence must stay "
            "within the devices of one host"
        )


def host_local_to_global(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """Assembles each host's share of the batch (whole sequences) into global arrays, rows over
    the batch axes and tokens over the context axis (see `check_context_within_hosts`)."""
    sharding = batch_sharding(mesh)
    return {
        name: jax.make_array_from_process_local_data(sharding, np.asarray(x))
        for name, x in batch.items()
    }
