"""Pallas GPU kernels for Gated DeltaNet-2 (Triton lowering; the forward state pass also in Mosaic
GPU, `ChunkConfig(state_lowering="mosaic")`); Pallas interpret mode on request.

`chunk_core` is the op's chunk core for `backend="pallas"` (see `pallas_kernels.chunk`);
`recurrent` the token-serial decoding kernel (see `pallas_kernels.recurrent`).
`fused_decode_step` one GDN-2 layer's decoding step between its projections (see
`pallas_kernels.decode`). `chunk_unsupported` / `recurrent_unsupported` / `decode_unsupported`
say why inputs cannot run (None when they can).
"""

from pallas_kernels.chunk import chunk_core, chunk_unsupported, pallas_chunk_core
from pallas_kernels.config import (
    DEFAULT_CHUNK_CONFIG,
    DEFAULT_DECODE_CONFIG,
    DEFAULT_RECURRENT_CONFIG,
    FLOAT32_CHUNK_CONFIG,
    ChunkConfig,
    DecodeConfig,
    Launch,
    RecurrentConfig,
    default_chunk_config,
)
from pallas_kernels.decode import DecodeShape, decode_unsupported, fused_decode_step
from pallas_kernels.recurrent import recurrent, recurrent_unsupported

__all__ = [
    "DEFAULT_CHUNK_CONFIG",
    "DEFAULT_DECODE_CONFIG",
    "DEFAULT_RECURRENT_CONFIG",
    "FLOAT32_CHUNK_CONFIG",
    "ChunkConfig",
    "DecodeConfig",
    "DecodeShape",
    "Launch",
    "RecurrentConfig",
    "chunk_core",
    "chunk_unsupported",
    "decode_unsupported",
    "default_chunk_config",
    "fused_decode_step",
    "pallas_chunk_core",
    "recurrent",
    "recurrent_unsupported",
]
