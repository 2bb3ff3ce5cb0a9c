"""The Gated Delta Rule-2 op: reference recurrence, chunkwise WY algorithm, tied-gate baselines."""

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
