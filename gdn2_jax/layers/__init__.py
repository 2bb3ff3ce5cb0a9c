"""Flax NNX layers: the GDN-2 mixer and the pieces of the language models around it."""

from gdn2_jax.layers.attention import Attention, KVCache
from gdn2_jax.layers.conv import ShortConvolution
from gdn2_jax.layers.gdn2 import GATE_MODES, GatedDeltaRule2, GDN2Cache
from gdn2_jax.layers.mlp import SwiGLU
from gdn2_jax.layers.norm import GatedRMSNorm, RMSNorm
from gdn2_jax.layers.rope import apply_rope

__all__ = [
    "GATE_MODES",
    "Attention",
    "GDN2Cache",
    "GatedDeltaRule2",
    "GatedRMSNorm",
    "KVCache",
    "RMSNorm",
    "ShortConvolution",
    "SwiGLU",
    "apply_rope",
]
