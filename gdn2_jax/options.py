"""The names every configurable choice accepts, in one place without JAX.

Configs (`gdn2_jax.model_config`, `gdn2_jax.config`) validate against these and import nothing
heavier; the layers and the op registry use the same tuples, so a name is declared exactly once.
"""

# Implementations of the op's chunk form and of its token-serial form ("auto" picks one).
CHUNK_BACKENDS = ("auto", "pallas", "xla", "scan")
RECURRENT_BACKENDS = ("auto", "pallas", "scan")

# GatedDeltaRule2
GATE_MODES = ("gdn2", "kda", "b_only", "w_only", "gdn")
TIED_GATE_MODES = ("kda", "gdn")  # one β per value head for both gates
LAYER_MODES = ("chunk", "recurrent")
OUTPUT_GATES = ("silu", "sigmoid")
# The decoding step: one fused Pallas kernel between the projections, XLA ops around the
# token-serial kernel, or "auto" (fused where it runs: a GPU or interpret mode, gdn2 gates).
DECODE_MODES = ("auto", "fused", "unfused")

# Attention mixers
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")

# Language models
MIXERS = ("gdn2", "swa", "attn")
# What a rematerialized block keeps for the backward (gdn2_jax.model.REMAT_POLICIES maps them).
REMAT_POLICIES = ("full", "dots", "gdn2_op", "dots_and_gdn2_op")
DTYPES = ("float32", "bfloat16", "float16")
