"""Frozen, validated block-size and launch configurations of the Pallas kernels.

Every kernel reads its tile sizes, warps and pipeline stages from one of these; tuning means
passing another instance, never editing a kernel. The chunk length (64) and the sub-block length
(16) of the safe decay factorization are fixed by the algorithm, not tunable.

A config checks itself twice: at construction (each tile a power of two >= 16, the smallest
Triton dot dimension; warps and stages in the ranges Triton launches) and at the call
(`check_dims`: each tile, clipped to the dimension it tiles, divides it), so a bad tile is a
ValueError naming the field, never a wrong number.
"""

import dataclasses

import jax.numpy as jnp

CHUNK = 64  # tokens per chunk (the WY block)
SUB = 16  # rows per sub-block of the safe factorization and of the blocked triangular solve
NUM_SUB = CHUNK // SUB
SUPPORTED_DIMS = (16, 32, 64, 128, 256)  # K and V: powers of two, >= 16 for Triton dots
# Elements of a state-pass program's float32 state tile S [K, BV]: a [128, 64] tile keeps it in
# registers; at K = 256 the V tile halves so the tile stays that size.
MAX_STATE_TILE = 128 * 64
MIN_TILE = 16
WARPS = (1, 2, 4, 8, 16)
SOLVE_CHOICES = ("float32", "tf32x3", "tf32")
CUMSUMS = ("xla", "pallas")
# How the forward state pass (with the output, structures "fused" and "split_prep") is lowered:
# "triton" (`chunk_fwd.chunk_state`) or "mosaic" (`state_mosaic.chunk_state_mosaic`: wgmma
# products, TMA loads pipelined over chunks; Hopper, 16-bit inputs, K in (64, 128)).
STATE_LOWERINGS = ("triton", "mosaic")
# How the forward is cut into launches (pallas_kernels/README.md): "fused" builds everything that
# does not depend on the state in one program per (chunk, head) and emits the output inside the
# state pass; "split" separates the solve from the WY apply and the output from the state pass;
# "split_prep" and "split_output" do one of the two, so each split can be timed alone.
STRUCTURES = ("fused", "split_prep", "split_output", "split")
# How the forward diagonal launch writes a block's column-loop results: "tile" assembles the
# block in registers (a [16, 16] select per column) and stores it once; "columns" stores each
# column straight to memory, as it is computed.
DIAG_STORES = ("tile", "columns")
# How the forward diagonal launch is cut into programs: "block", one per 16-row sub-block, whose
# loop walks the block's columns (8 dependent steps); "token", one per token row, which loads its
# sub-block's 16 rows of k and G and forms its row of both blocks with one [16, K] exp, no loop
# (16 times the programs; `diag_store` does not apply).
DIAG_GRIDS = ("block", "token")
# How a block-grid program forms its diagonal 16x16 blocks: "loop" factors the lower-left 8x8
# quadrant through the block's midpoint and walks the two diagonal quadrants column by column
# (8 dependent steps of [16, K] exps and reductions); "levels" factors the lower-left quadrant of
# every 16-, 8-, 4- and 2-row block through its own midpoint, one masked [16, K] x [K, 16]
# matmul per level and output, no loop (the exps are as many; `diag_store` does not apply).
DIAG_BLOCKS = ("loop", "levels")
# How the split solve forms the off-diagonal score blocks: "joint" A_qk's and T's in one K loop
# (twelve accumulators live with their loads), "apart" T's, then the inverse, then A_qk's in a
# second K loop (loads k and G twice; ptxas spills 96 instead of 648 bytes a thread); "pairs"
# both in one K loop per block pair (each loop holds one pair's tiles: no spills).
SOLVE_SCORES = ("joint", "apart", "pairs")
# How the split solve inverts T's diagonal 16x16 blocks: "substitution" row by row on the CUDA
# cores, "doubling" as four levels of two [16, 16] matmuls (exact, on the tensor cores where the
# solve precision allows).
DIAG_INVERSES = ("substitution", "doubling")
MAX_STAGES = 8


def state_tile_v(block_v: int, K: int, V: int) -> int:
    """The V columns per state-pass program: `block_v` clipped to V and to MAX_STATE_TILE / K."""
    return min(block_v, V, MAX_STATE_TILE // K)


# The state passes' automatic run count: enough runs for about this many programs, at most
# MAX_STATE_RUNS. On an H100 the forward state pass at 1x16384 (32 programs) took 0.561 ms in 4
# runs, 0.602 in 8, 0.736 in 16 and 1.005 in one; at 4x4096 (128 programs) 2 runs made the op
# slower (1.84 against 1.69 ms forward; benchmarks/RESULTS.md, 2026-12-08).
STATE_PASS_PROGRAMS = 128
MAX_STATE_RUNS = 8


def state_runs(parts: int | None, programs: int, NT: int) -> int:
    """The runs of a row's NT chunks a state pass of `programs` programs per run walks."""
    if parts is None:
        parts = min(MAX_STATE_RUNS, max(1, STATE_PASS_PROGRAMS // programs))
    return min(parts, NT)


def _is_power_of_two(n) -> bool:
    return isinstance(n, int) and n > 0 and not n & (n - 1)


def _check_tile(owner: str, name: str, value) -> None:
    if not _is_power_of_two(value) or value < MIN_TILE:
        raise ValueError(f"{owner}.{name} must be a power of two >= {MIN_TILE}, got {value!r}")


def _check_tiles(config, counts=()) -> None:
    """Every int field a tile, except the `counts` (each None or an int >= 1)."""
    owner = type(config).__name__
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name in counts:
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{owner}.{field.name} must be None or an int >= 1, got {value!r}")
        elif value is not None and not isinstance(value, (Launch, str)):
            _check_tile(owner, field.name, value)


def _check_divides(config, tiles, dims: dict[str, int]) -> None:
    """Each (field, dimension name) of `tiles`: the field, clipped to the dimension, divides it."""
    owner = type(config).__name__
    for name, dim in tiles:
        tile, size = getattr(config, name), dims[dim]
        if tile is not None and size % min(tile, size):
            raise ValueError(f"{owner}.{name}={tile} does not divide {dim}={size}")


@dataclasses.dataclass(frozen=True)
class Launch:
    """One pallas_call's Triton launch parameters."""

    num_warps: int = 4
    num_stages: int = 1

    def __post_init__(self):
        if self.num_warps not in WARPS:
            raise ValueError(f"Launch.num_warps must be one of {WARPS}, got {self.num_warps!r}")
        if not isinstance(self.num_stages, int) or not 1 <= self.num_stages <= MAX_STAGES:
            raise ValueError(
                f"Launch.num_stages must be an int in [1, {MAX_STAGES}], got {self.num_stages!r}"
            )


# The state passes (forward and reverse, and their runs' maps) load K-wide tiles of several
# arrays per chunk: at K = 256 two pipeline stages ask for more shared memory than an H100 SM
# has (232,448 B): the reverse pass asked for 237,588 B on one (benchmarks/RESULTS.md,
# 2026-12-07), and the forward pass with its stores for 241,684 by `kernel_resources.py`
# (53,248 at one stage). Above this K they run one stage.
MAX_PIPELINED_STATE_K = 128


def state_pass_launch(launch: Launch, K: int) -> Launch:
    """A state pass's launch at K: one stage above MAX_PIPELINED_STATE_K."""
    if K <= MAX_PIPELINED_STATE_K:
        return launch
    return dataclasses.replace(launch, num_stages=1)


@dataclasses.dataclass(frozen=True)
class ChunkConfig:
    """Tiles of the chunkwise forward and backward kernels (K, V, a block are clipped to K, V)."""

    # Where G = cumsum(g) and each chunk's total decay are formed (CUMSUMS): "xla" (jnp.cumsum,
    # then a transpose to the per-head layout) or "pallas" (one launch writing that layout).
    # The XLA form and its transpose take ~0.33 ms at 4x4096 on an H100 (benchmarks/RESULTS.md,
    # 2026-12-08); the launch has not been timed yet.
    cumsum: str = "xla"
    cumsum_block_k: int = 64  # K columns per program of the cumsum launch
    cumsum_launch: Launch = Launch(num_warps=4, num_stages=1)
    # 32-wide K slices beat 64 in the H100 sweep (benchmarks/RESULTS.md, 2026-11-26 session 2).
    intra_block_k: int = 32  # K slice of the off-diagonal score loop (forward intra kernel)
    aux_block: int = 64  # column slice of U, Y, Q_γ, K_tail (forward intra kernel)
    # 2 warps: 2.26 against 2.49 ms with 4 at 4x4096 on an H200 (benchmarks/RESULTS.md). Under
    # the prep split this launches the solve alone, whose loads 2 stages overlap with its
    # products: 0.456 against 0.585 ms at 4x4096 on an H100 (ncu: it issued in 27% of cycles).
    intra: Launch = Launch(num_warps=2, num_stages=2)
    solve: str = "float32"  # precision of the triangular solve's block merges: SOLVE_CHOICES
    diag: Launch = Launch(num_warps=2, num_stages=1)  # the forward's diagonal 16x16 blocks
    diag_store: str = "tile"  # DIAG_STORES
    diag_grid: str = "block"  # DIAG_GRIDS
    diag_blocks: str = "loop"  # DIAG_BLOCKS (block grid)
    # K slice of diag_blocks="levels": with whole K rows (128) its launch took 255 registers a
    # thread, spilled, and ran at 12.5% occupancy on an H100 (benchmarks/RESULTS.md).
    diag_block_k: int = 32
    # K slice of the column loop (diag_blocks="loop"); None: whole K rows. The loop at whole K
    # takes 255 registers and issues in half its cycles at 12% occupancy (H100 ncu,
    # benchmarks/RESULTS.md): slices hold fewer live tiles at about the same work.
    # 32: the launch 391 against 477 us at whole K, 533 at 16 (H100 ncu, 4x4096, 2026-12-07).
    diag_loop_block_k: int | None = 32
    state_block_v: int = 64  # V columns of the carried state per program (forward state pass)
    # Runs each row's chunks are cut into for the state passes (forward and reverse), walked
    # side by side (pallas_kernels/state_walk.py): more programs where B·H is small; 1: one
    # serial walk; None: `state_runs` picks from the programs the walk has.
    state_parts: int | None = None
    state: Launch = Launch(num_warps=4, num_stages=2)
    # STATE_LOWERINGS. Under "mosaic" `state.num_stages` is the chunks its TMA loads run ahead.
    state_lowering: str = "triton"
    dstate_block_v: int = 64  # V columns of the carried state gradient (reverse state pass)
    dstate: Launch = Launch(num_warps=4, num_stages=2)
    wy_block_k: int = 32  # K and V tiles of the gate-aware WY backward kernel
    wy_block_v: int = 64
    wy: Launch = Launch(num_warps=4, num_stages=1)
    # 64: 2.46 against 2.86 ms with 32 at 4x4096 on an H200.
    intra_bwd_block_k: int = 64  # K tile (grid axis) of the intra-chunk score backward
    intra_bwd: Launch = Launch(num_warps=4, num_stages=1)
    intra_bwd_diag_block_k: int = 16  # K tile (grid axis) of its diagonal pairwise tiles
    intra_bwd_diag: Launch = Launch(num_warps=2, num_stages=1)  # its diagonal 16x16 blocks
    # The forward's launch structure (STRUCTURES). With the prep split, `intra` launches the
    # scores and the solve alone and `aux_block` tiles the WY apply's columns; with the output
    # split, `state` launches the state-only pass.
    # split_prep with the doubling inverse: forward 1.84 against 2.42 ms, forward+backward 5.76
    # against 6.65 with the fused structure at 4x4096 in bf16 on an H100 (benchmarks/RESULTS.md).
    structure: str = "split_prep"
    diag_inverse: str = "doubling"  # DIAG_INVERSES (the split solve launch)
    solve_scores: str = "joint"  # SOLVE_SCORES (the split solve launch)
    wy_apply: Launch = Launch(num_warps=4, num_stages=2)  # U, Y, Q_γ, K_tail per column tile
    output_block_v: int = 64  # V columns per output program (clipped as the state tile is)
    output: Launch = Launch(num_warps=4, num_stages=2)

    # Which dimension each tile splits (aux_block slices both).
    TILED = (
        ("cumsum_block_k", "K"),
        ("intra_block_k", "K"),
        ("diag_block_k", "K"),
        ("diag_loop_block_k", "K"),
        ("state_block_v", "V"),
        ("dstate_block_v", "V"),
        ("wy_block_k", "K"),
        ("wy_block_v", "V"),
        ("intra_bwd_block_k", "K"),
        ("intra_bwd_diag_block_k", "K"),
        ("aux_block", "K"),
        ("aux_block", "V"),
        ("output_block_v", "V"),
    )

    def __post_init__(self):
        _check_tiles(self, counts=("state_parts",))
        for name, choices in (
            ("cumsum", CUMSUMS),
            ("solve", SOLVE_CHOICES),
            ("diag_store", DIAG_STORES),
            ("diag_grid", DIAG_GRIDS),
            ("diag_blocks", DIAG_BLOCKS),
            ("solve_scores", SOLVE_SCORES),
            ("diag_inverse", DIAG_INVERSES),
            ("structure", STRUCTURES),
            ("state_lowering", STATE_LOWERINGS),
        ):
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(f"ChunkConfig.{name} must be one of {choices}, got {value!r}")
        if self.state_lowering == "mosaic" and self.structure not in ("fused", "split_prep"):
            raise ValueError(
                "ChunkConfig.state_lowering='mosaic' lowers the state pass that emits the output "
                f"(structure 'fused' or 'split_prep'), got structure={self.structure!r}"
            )

    def check_dims(self, K: int, V: int) -> None:
        _check_divides(self, self.TILED, {"K": K, "V": V})


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Fused decoding step (`pallas_kernels.decode`): one program per (sequence, value head,
    block of `block_v` state columns), which holds its [K, block_v] float32 state tile in
    registers. A program that holds a whole head's V columns also applies the gated RMSNorm;
    with smaller tiles the norm over V, which spans programs, follows as one XLA fusion.
    `launch` None takes one warp per 2048 state elements (64 a thread), 1 to 8 warps."""

    # 32: a 1.3B layer step (H = 16, K = V = 128) takes 13.3 against 19.6 us with whole heads
    # at batch 1 and 81.9 against 118.1 at batch 64 on an H100 (benchmarks/RESULTS.md); 16 and
    # 64 win one batch each by ~1 us and lose the other.
    block_v: int = 32
    launch: Launch | None = None

    def __post_init__(self):
        _check_tiles(self)

    def check_dims(self, K: int, V: int) -> None:
        del K
        _check_divides(self, (("block_v", "V"),), {"V": V})

    def tile_v(self, V: int) -> int:
        return min(self.block_v, V)

    def launch_for(self, K: int, V: int) -> Launch:
        if self.launch is not None:
            return self.launch
        return Launch(num_warps=min(8, max(1, K * self.tile_v(V) // 2048)), num_stages=1)


DEFAULT_DECODE_CONFIG = DecodeConfig()


@dataclasses.dataclass(frozen=True)
class RecurrentConfig:
    """Token-serial decoding kernel: one program per (V block, sequence, head)."""

    block_v: int = 32
    launch: Launch = Launch(num_warps=4, num_stages=1)

    def __post_init__(self):
        _check_tiles(self)

    def check_dims(self, K: int, V: int) -> None:
        del K
        _check_divides(self, (("block_v", "V"),), {"V": V})


DEFAULT_CHUNK_CONFIG = ChunkConfig()
# float32 tiles are twice the bytes: the state passes' multi-stage pipelines would ask for more
# shared memory than an H100 has (262 KB requested, 227 KB available).
# The intra tiles, the forward's structure and the serial state walks stay as they were before
# the bf16 tuning, which was not timed in float32.
FLOAT32_CHUNK_CONFIG = dataclasses.replace(
    DEFAULT_CHUNK_CONFIG,
    structure="fused",
    diag_inverse="substitution",
    diag_loop_block_k=None,
    state_parts=1,
    state=Launch(4, 1),
    dstate=Launch(4, 1),
    intra=Launch(4, 1),
    intra_bwd_block_k=32,
)


def default_chunk_config(dtype) -> ChunkConfig:
    """The tuned defaults for inputs of `dtype` (16-bit or float32)."""
    return FLOAT32_CHUNK_CONFIG if jnp.dtype(dtype) == jnp.float32 else DEFAULT_CHUNK_CONFIG


DEFAULT_RECURRENT_CONFIG = RecurrentConfig()
