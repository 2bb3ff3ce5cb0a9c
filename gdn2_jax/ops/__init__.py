"""The Gated Delta Rule-2 op: reference recurrence, chunkwise WY algorithm, tied-gate baselines.

`gdn2_jax.ops.registry` holds the named implementations of each form and how "auto" picks one;
`gdn2_jax.ops.sharded` runs the same entry points per shard under a mesh.
"""

from gdn2_jax.ops.api import (
    BACKENDS,
    RECURRENT_BACKENDS,
    gated_delta_rule,
    gated_delta_rule2,
    gated_delta_rule2_recurrent,
    gated_delta_rule2_step,
    kda,
)
from gdn2_jax.ops.reference import l2norm

__all__ = [
    "BACKENDS",
    "RECURRENT_BACKENDS",
    "gated_delta_rule",
    "gated_delta_rule2",
    "gated_delta_rule2_recurrent",
    "gated_delta_rule2_step",
    "kda",
    "l2norm",
]
