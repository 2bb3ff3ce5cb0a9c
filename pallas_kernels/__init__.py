"""Pallas (Triton lowering) GPU kernels for Gated DeltaNet-2; interpret mode off a GPU.

`chunk_core` is the op's chunk core for `backend="pallas"` (see `pallas_kernels.chunk`);
`recurrent` the token-serial decoding kernel (see `pallas_kernels.recurrent`).
"""

from pallas_kernels.chunk import chunk_core, pallas_chunk_core
from pallas_kernels.config import (
    DEFAULT_CHUNK_CONFIG,
    DEFAULT_RECURRENT_CONFIG,
    FLOAT32_CHUNK_CONFIG,
    ChunkConfig,
    Launch,
    RecurrentConfig,
    default_chunk_config,
)

__all__ = [
    "DEFAULT_CHUNK_CONFIG",
    "DEFAULT_RECURRENT_CONFIG",
    "FLOAT32_CHUNK_CONFIG",
    "ChunkConfig",
    "Launch",
    "RecurrentConfig",
    "chunk_core",
    "default_chunk_config",
    "pallas_chunk_core",
]
