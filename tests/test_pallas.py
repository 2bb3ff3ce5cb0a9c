"""The Pallas kernels in interpret mode (CPU): the op's shared suite for backend="pallas", the
decoding kernel against fla's naive recurrence, and the kernels under non-default tile configs.

Interpret mode proves numerics, not lowering: tests/test_pallas_gpu.py runs the same on a GPU.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from fla.ops.gdn2.naive import naive_recurrent_gdn2
from op_testing import OpBackendTests
from testing import kernel_launches, kernel_names, primitives_outside_kernels

import pallas_kernels
from gdn2_jax.crosscheck import NAMES, Shape, make_inputs, rel_err
from gdn2_jax.ops import gated_delta_rule2, gated_delta_rule2_recurrent, gated_delta_rule2_step
from gdn2_jax.ops.core import xla_chunk_core
from gdn2_jax.ops.layout import dense_segments, packed_segments
from pallas_kernels import (
    DEFAULT_CHUNK_CONFIG,
    ChunkConfig,
    Launch,
    RecurrentConfig,
    chunk_core,
    pallas_chunk_core,
)
from pallas_kernels.chunk_fwd import chunk_diag
from pallas_kernels.common import numerics_for
from pallas_kernels.config import MAX_STATE_RUNS, STATE_PASS_PROGRAMS, state_runs
from pallas_kernels.recurrent import recurrent

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


class TestPallasBackend(OpBackendTests):
    backend = "pallas"
    interpret = True


# 16-wide tiles at K = V = 32: every K and V loop runs twice, the split WY apply runs two value
# and two key tiles per chunk and its output launch two V tiles.
SMALL_TILES = ChunkConfig(
    intra_block_k=16,
    aux_block=16,
    state_block_v=16,
    dstate_block_v=16,
    wy_block_k=16,
    wy_block_v=16,
    intra_bwd_block_k=16,
    intra_bwd_diag_block_k=16,
    output_block_v=16,
)
SPLIT_FORWARD = {
    "gdn2_chunk_fwd_diag": 1,
    "gdn2_chunk_fwd_solve": 1,
    "gdn2_chunk_fwd_wy": 1,
    "gdn2_chunk_fwd_states": 1,
}


def bind_chunk_config(monkeypatch, cfg):
    """Runs the op's backend="pallas" chunk kernels under `cfg` for the rest of the test."""
    monkeypatch.setattr(pallas_kernels, "chunk_core", functools.partial(chunk_core, cfg=cfg))


class TestPallasSplitBackend(TestPallasBackend):
    """The shared suite on `ChunkConfig(structure="split")`, bound into the op's registration
    point. Only the cases that load every forward launch differently (extreme gates down to
    -80 with initial states, bf16 storage of the intermediates) run here: the op around the core
    (padding, packing, l2norm, reductions, jit) is the same code for both structures, and
    test_split_structure_on_packed_sequences_matches_xla_core covers state resets; the whole
    class in interpret mode would cost minutes of CI."""

    @pytest.fixture(autouse=True)
    def _split_core(self, monkeypatch):
        bind_chunk_config(monkeypatch, dataclasses.replace(DEFAULT_CHUNK_CONFIG, structure="split"))

    test_matches_fla_naive = None
    test_strong_decay_whole_chunk = None
    test_packed_sequences_match_separate_runs = None
    test_packed_sequences_under_jit = None
    test_nan_stays_in_its_sequence = None
    test_kda_reduction_matches_fla = None
    test_gated_delta_rule_reduction_matches_fla = None
    test_l2norm_and_scale_match_fla = None
    test_bfloat16_gradients_have_input_dtypes = None
    test_jit_matches_eager = None

    def test_the_op_runs_the_split_launches(self):
        x = make_inputs(49, Shape(T=70))
        args = [jnp.asarray(x[n]) for n in NAMES[:6]]
        # Two chunks of 4 heads: the default state walk runs in two runs, hence their maps.
        expected = {**SPLIT_FORWARD, "gdn2_chunk_fwd_output": 1, "gdn2_chunk_fwd_part_maps": 1}
        assert kernel_names(self.op, *args) == expected

        def loss(*a):
            return jnp.sum(self.op(*a)[0])

        names = kernel_names(jax.grad(loss, argnums=tuple(range(6))), *args)
        assert {n: names[n] for n in SPLIT_FORWARD} == SPLIT_FORWARD
        assert names["gdn2_chunk_fwd_output_save"] == 1
        assert not {"gdn2_chunk_fwd_intra", "gdn2_chunk_fwd_state_save"} & set(names)


class TestPallasStatePartsBackend(TestPallasBackend):
    """The shared suite's cases with packed sequences and initial states on the state pass cut
    into three runs per row (`ChunkConfig.state_parts=3`); the rest of the op is the default
    path's code (test_state_pass_in_parts_* cover the runs' maps and resets)."""

    @pytest.fixture(autouse=True)
    def _parts_core(self, monkeypatch):
        bind_chunk_config(monkeypatch, dataclasses.replace(DEFAULT_CHUNK_CONFIG, state_parts=3))

    test_extreme_gates_finite_and_exact = None
    test_strong_decay_whole_chunk = None
    test_kda_reduction_matches_fla = None
    test_gated_delta_rule_reduction_matches_fla = None
    test_l2norm_and_scale_match_fla = None
    test_bfloat16_close_to_float32_reference = None
    test_bfloat16_gradients_have_input_dtypes = None
    test_jit_matches_eager = None


def fla_recurrent(x, lo=None, hi=None, h0=None):
    tensors = [torch.tensor(x[n][:, lo:hi]) for n in NAMES[:6]]
    h0 = x["initial_state"] if h0 is None else h0
    o, S = naive_recurrent_gdn2(*tensors, initial_state=torch.tensor(h0), output_final_state=True)
    return o.numpy(), S.numpy()


@pytest.mark.parametrize("dims", [(32, 64), (128, 16)])
def test_recurrent_kernel_matches_fla(dims):
    K, V = dims
    x = make_inputs(40, Shape(B=2, T=21, H=2, K=K, V=V), extreme=True)
    args = [jnp.asarray(x[n]) for n in NAMES[:6]]
    o, S = recurrent(*args, jnp.asarray(x["initial_state"]), interpret=True)
    o_ref, S_ref = fla_recurrent(x)
    # float32 against float32, the same token order: a few ulps per step.
    assert rel_err(o, o_ref) <= 1e-5 and rel_err(S, S_ref) <= 1e-5


def test_recurrent_kernel_packed_sequences():
    cu = np.array([0, 9, 9, 30], np.int32)
    x = make_inputs(41, Shape(B=1, T=30, H=2, K=16, V=32))
    h0 = make_inputs(42, Shape(B=3, T=1, H=2, K=16, V=32))["initial_state"]
    cfg = RecurrentConfig(block_v=16, launch=Launch(num_warps=2))
    args = [jnp.asarray(x[n]) for n in NAMES[:6]]
    o, S = recurrent(*args, jnp.asarray(h0), cu_seqlens=jnp.asarray(cu), cfg=cfg, interpret=True)
    assert rel_err(S[1], h0[1]) == 0.0, "an empty sequence keeps its initial state"
    for n, (lo, hi) in enumerate([(0, 9), (9, 30)]):
        slot = 2 * n
        o_ref, S_ref = fla_recurrent(x, lo, hi, h0[slot : slot + 1])
        assert rel_err(o[:, lo:hi], o_ref) <= 1e-5
        assert rel_err(S[slot : slot + 1], S_ref) <= 1e-5


def test_recurrent_kernel_bfloat16_output_dtype():
    x = make_inputs(43, Shape(B=1, T=8, H=1, K=16, V=16))
    args = [jnp.asarray(x[n], jnp.float32 if n == "g" else jnp.bfloat16) for n in NAMES[:6]]
    o, S = recurrent(*args, jnp.asarray(x["initial_state"]), interpret=True)
    o_ref, S_ref = fla_recurrent(x)
    assert o.dtype == jnp.bfloat16 and S.dtype == jnp.float32
    # bf16 inputs and output (8 mantissa bits); the state itself stays float32.
    assert rel_err(o.astype(jnp.float32), o_ref) <= 2e-2 and rel_err(S, S_ref) <= 2e-2


def _assert_core_matches_xla_core(cfg, shape, seed, chunk_bounds=None, g_scale=None):
    """Output, finals and every gradient (inputs and h0s) of the kernels against the XLA core;
    `chunk_bounds` (sequence boundaries in chunks, B = 1) packs several sequences in one row.
    The inputs have extreme gates unless `g_scale` sets the scale of mild ones."""
    mild = {"g_scale": g_scale} if g_scale else {"extreme": True}
    x = make_inputs(seed, shape, **mild)
    args = [jnp.asarray(x[n]) for n in NAMES[:6]]
    num_chunks = shape.T // 64
    if chunk_bounds is None:
        h0 = jnp.asarray(x["initial_state"])[None]
        seg = dense_segments(num_chunks)
    else:
        n = len(chunk_bounds) - 1
        h0 = jnp.asarray(make_inputs(seed + 2, dataclasses.replace(shape, B=n))["initial_state"])
        h0 = h0[:, None]
        seg = packed_segments(jnp.asarray(chunk_bounds, jnp.int32), num_chunks)
    h0s = jnp.concatenate([h0, jnp.zeros_like(h0[:1])])  # the last slot: padding's zero state
    rng = np.random.default_rng(seed + 1)
    cot = tuple(jnp.asarray(rng.standard_normal(s), jnp.float32) for s in (x["v"].shape, h0s.shape))

    def run(core):
        out, vjp = jax.vjp(lambda *a: core(*a, seg, 0.3, 64), *args, h0s)
        return (*out, *vjp(cot))

    ours = run(lambda *a: pallas_chunk_core(*a, cfg, True))
    reference = run(xla_chunk_core)
    for n, (a, b) in enumerate(zip(ours, reference, strict=True)):
        # finals and dh0s: the last slot is the unused zero slot.
        a, b = (a[:-1], b[:-1]) if n in (1, 8) else (a, b)
        assert rel_err(a, b) <= 1e-5, n


def test_chunk_core_under_other_tiles_matches_xla_core():
    """Every K/V loop of every kernel taken more than once (16-wide tiles at K = V = 32)."""
    _assert_core_matches_xla_core(SMALL_TILES, Shape(B=1, T=128, H=2, K=32, V=32), seed=44)


@pytest.mark.parametrize("solve_scores", ["joint", "apart", "pairs"])
def test_split_structure_on_packed_sequences_matches_xla_core(solve_scores):
    """The split forward's five launches (and the shared backward) with 16-wide tiles, the
    diagonal launch storing its columns, the diagonal inverses by doubling and the solve's
    score blocks in one K loop, two, or one per block pair; three sequences packed in one row:
    one chunk, an empty one, two chunks."""
    cfg = dataclasses.replace(
        SMALL_TILES, structure="split", diag_store="columns", diag_inverse="doubling",
        solve_scores=solve_scores,
    )  # fmt: skip
    shape = Shape(B=1, T=192, H=2, K=32, V=32)
    _assert_core_matches_xla_core(cfg, shape, seed=45, chunk_bounds=(0, 1, 1, 3))


@pytest.mark.parametrize("structure", ["fused", "split"])
@pytest.mark.parametrize("parts", [2, 3])
def test_state_pass_in_parts_on_packed_sequences_matches_xla_core(structure, parts):
    """state_parts: the row's chunks walked in runs from their entering states. Three chunks
    of three packed sequences (one chunk, an empty one, two chunks): with 2 parts the first
    run starts two sequences (its map is zero) and the second continues one; with 3 every
    chunk is a run of its own."""
    cfg = dataclasses.replace(SMALL_TILES, structure=structure, state_parts=parts)
    shape = Shape(B=1, T=192, H=2, K=32, V=32)
    _assert_core_matches_xla_core(cfg, shape, seed=51, chunk_bounds=(0, 1, 1, 3), g_scale=3e-3)


@pytest.mark.parametrize("parts", [2, 4, 8])
def test_state_pass_in_parts_of_one_sequence_matches_xla_core(parts):
    """One sequence of five chunks per row in 2, 4 or 8 runs (runs of 3 + 2, 2 + 2 + 1 and one
    chunk each, the last three empty): the states entering the runs come from the runs' maps
    alone. Mild gates (a chunk keeps ~80% of its state) so that the maps matter. The runs'
    map launches are in the traced programs, forward and backward."""
    cfg = dataclasses.replace(SMALL_TILES, state_parts=parts)
    _assert_core_matches_xla_core(cfg, Shape(B=2, T=320, H=2, K=32, V=16), seed=52, g_scale=3e-3)
    x = make_inputs(52, Shape(B=1, T=320, H=2, K=32, V=16))
    args = [jnp.asarray(x[n]) for n in NAMES[:6]]
    h0s = jnp.zeros((2, 1, 2, 32, 16), jnp.float32)

    def core(*a):
        return pallas_chunk_core(*a, h0s, dense_segments(5), 0.3, 64, cfg, True)

    names = kernel_names(core, *args)
    assert names["gdn2_chunk_fwd_part_maps"] == 1 and names["gdn2_chunk_fwd_state"] == 1

    def loss(*a):
        return jnp.sum(core(*a)[0])

    names = kernel_names(jax.grad(loss, argnums=tuple(range(6))), *args)
    assert names["gdn2_chunk_bwd_part_maps"] == 1 and names["gdn2_chunk_bwd_dstate"] == 1


def test_state_pass_in_parts_keeps_a_nan_in_its_sequence():
    """A NaN state leaving run 0 (sequence A, chunk 0) meets run 1's map, which is zero because
    sequence B starts there; B continues into run 2, whose entering state must be B's alone
    (0 · NaN would be NaN)."""
    shape = Shape(B=1, T=192, H=2, K=32, V=32)
    x = make_inputs(53, shape, g_scale=3e-3)
    x["v"][0, 10, 0, 0] = np.nan
    args = [jnp.asarray(x[n]) for n in NAMES[:6]]
    h0s = jnp.zeros((3, 1, 2, 32, 32), jnp.float32)
    seg = packed_segments(jnp.asarray([0, 1, 3], jnp.int32), 3)
    cfg = dataclasses.replace(SMALL_TILES, state_parts=3)
    o, finals = pallas_chunk_core(*args, h0s, seg, 0.3, 64, cfg, True)
    o_ref, finals_ref = xla_chunk_core(*args, h0s, seg, 0.3, 64)
    assert np.isnan(np.asarray(o[:, :64])).any()
    assert np.isfinite(np.asarray(o[:, 64:])).all()
    assert rel_err(o[:, 64:], o_ref[:, 64:]) <= 1e-5
    assert rel_err(finals[1], finals_ref[1]) <= 1e-5


def test_state_pass_in_runs_keeps_a_nan_gradient_in_its_sequence():
    """Four runs of one chunk; the output cotangent of sequence B (chunks 2-3) has a NaN in
    chunk 3. The reverse pass's gradient entering run 2 is NaN, and run 2's map is zero because
    B starts there: the gradient entering run 1 (sequence A) must be exactly A's own."""
    shape = Shape(B=1, T=256, H=2, K=32, V=32)
    x = make_inputs(54, shape, g_scale=3e-3)
    args = [jnp.asarray(x[n]) for n in NAMES[:6]]
    h0s = jnp.zeros((3, 1, 2, 32, 32), jnp.float32)
    seg = packed_segments(jnp.asarray([0, 2, 4], jnp.int32), 4)
    cfg = dataclasses.replace(SMALL_TILES, state_parts=4)
    rng = np.random.default_rng(55)
    do = rng.standard_normal(x["v"].shape).astype(np.float32)
    do[0, 200, 0, 0] = np.nan
    cot = (jnp.asarray(do), jnp.zeros_like(h0s))

    def grads(core):
        return jax.vjp(lambda *a: core(*a, h0s, seg, 0.3, 64), *args)[1](cot)

    ours = grads(lambda *a: pallas_chunk_core(*a, cfg, True))
    reference = grads(xla_chunk_core)
    assert np.isnan(np.asarray(ours[0][:, 128:])).any(), "B's own gradient shows the NaN"
    for a, b in zip(ours[:6], reference[:6], strict=True):
        assert np.isfinite(np.asarray(a[:, :128])).all()
        assert rel_err(a[:, :128], b[:, :128]) <= 1e-5


def test_state_runs_follow_the_programs_of_the_walk():
    """state_parts None: enough runs for ~STATE_PASS_PROGRAMS programs, at most MAX_STATE_RUNS
    and the chunk count; an explicit count is kept (up to the chunks)."""
    assert state_runs(None, 32, 256) == STATE_PASS_PROGRAMS // 32 == 4  # 1x16384, H = 16
    assert state_runs(None, STATE_PASS_PROGRAMS, 64) == 1  # 4x4096: already enough programs
    assert state_runs(None, 2, 256) == MAX_STATE_RUNS
    assert state_runs(None, 2, 3) == 3
    assert state_runs(5, 2, 3) == 3 and state_runs(2, 1000, 64) == 2
    # The bf16 default at one long sequence of few heads walks in runs, forward and backward.
    x = make_inputs(56, Shape(B=1, T=512, H=2, K=32, V=32))
    args = [jnp.asarray(x[n], jnp.float32 if n == "g" else jnp.bfloat16) for n in NAMES[:6]]

    def loss(*a):
        return jnp.sum(gated_delta_rule2(*a, backend="pallas", interpret=True)[0])

    names = kernel_names(jax.grad(loss, argnums=tuple(range(6))), *args)
    assert names["gdn2_chunk_fwd_part_maps"] == 1 and names["gdn2_chunk_bwd_part_maps"] == 1


@pytest.mark.parametrize("structure", ["fused", "split_prep"])
def test_cumsum_launch_matches_xla_core(structure):
    """cumsum="pallas": G and each chunk's total decay from one launch (two K tiles of 16 at
    K = 32), extreme gates and packed sequences, every gradient; the launch is in the traced
    program and XLA's cumsum is not."""
    cfg = dataclasses.replace(SMALL_TILES, structure=structure, cumsum="pallas", cumsum_block_k=16)
    shape = Shape(B=1, T=192, H=2, K=32, V=32)
    _assert_core_matches_xla_core(cfg, shape, seed=58, chunk_bounds=(0, 1, 1, 3))
    x = make_inputs(58, shape)
    args = [jnp.asarray(x[n]) for n in NAMES[:6]]
    h0s = jnp.zeros((2, 1, 2, 32, 32), jnp.float32)

    def core(*a):
        return pallas_chunk_core(*a, h0s, dense_segments(3), 0.3, 64, cfg, True)

    assert kernel_names(core, *args)["gdn2_chunk_cumsum"] == 1
    assert primitives_outside_kernels(core, *args)["cumsum"] == 0
    default = dataclasses.replace(cfg, cumsum="xla")
    assert (
        primitives_outside_kernels(
            lambda *a: pallas_chunk_core(*a, h0s, dense_segments(3), 0.3, 64, default, True), *args
        )["cumsum"]
        == 1
    )


def test_state_parts_must_be_a_positive_int():
    with pytest.raises(ValueError, match="state_parts must be None or an int >= 1"):
        ChunkConfig(state_parts=0)


@pytest.mark.parametrize("structure", ["fused", "split"])
def test_token_parallel_diagonal_launch_matches_xla_core(structure):
    """diag_grid="token": one program per token row forms the diagonal blocks; packed sequences
    (one chunk, an empty one, two chunks) under both forward structures."""
    cfg = dataclasses.replace(SMALL_TILES, structure=structure, diag_grid="token")
    shape = Shape(B=1, T=192, H=2, K=32, V=32)
    _assert_core_matches_xla_core(cfg, shape, seed=48, chunk_bounds=(0, 1, 1, 3))


@pytest.mark.parametrize("structure", ["fused", "split_prep"])
def test_levels_diagonal_blocks_match_xla_core(structure):
    """diag_blocks="levels": every level's quadrants of the diagonal blocks as masked matmuls
    through their midpoints; extreme gates, packed sequences, both forward structures."""
    cfg = dataclasses.replace(
        SMALL_TILES, structure=structure, diag_blocks="levels", diag_block_k=16
    )
    shape = Shape(B=1, T=192, H=2, K=32, V=32)
    _assert_core_matches_xla_core(cfg, shape, seed=49, chunk_bounds=(0, 1, 1, 3))


@pytest.mark.parametrize("structure", ["fused", "split_prep"])
def test_k_sliced_column_loop_matches_xla_core(structure):
    """diag_loop_block_k < K: the column loop's products summed over K slices; extreme gates,
    packed sequences, both forward structures, every gradient."""
    cfg = dataclasses.replace(SMALL_TILES, structure=structure, diag_loop_block_k=16)
    shape = Shape(B=1, T=192, H=2, K=32, V=32)
    _assert_core_matches_xla_core(cfg, shape, seed=51, chunk_bounds=(0, 1, 1, 3))


def test_k_sliced_column_loop_launch_equals_whole_k_rows():
    """The diagonal launch's outputs with the column loop over two K slices against whole K
    rows at g down to −80 a token (a slice's sums dropped or counted twice would be off by
    about one slice's share); and its traced launch loops over the slices."""
    x = make_inputs(52, Shape(B=1, T=64, H=2, K=32, V=32), extreme=True)
    q, k, b = (jnp.asarray(x[n]) for n in "qkb")
    G = jnp.cumsum(jnp.asarray(x["g"]), axis=1).transpose(0, 2, 1, 3).reshape(2, 64, 32)
    num = numerics_for(jnp.float32, True)

    def diag(block_k):
        cfg = dataclasses.replace(SMALL_TILES, diag_loop_block_k=block_k)
        return chunk_diag(q, k, b, G, scale=0.3, cfg=cfg, num=num)

    sliced, whole = diag(16), diag(None)
    for a, want in zip(sliced, whole, strict=True):
        assert bool(jnp.all(jnp.isfinite(a)))
        assert 0.0 < rel_err(a, want) <= 1e-6 or bool(jnp.all(a == want))
    loops = [str(jax.make_jaxpr(lambda *a, n=n: diag(n))(q)).count("scan[") for n in (16, None)]
    assert loops[0] == loops[1] + 1, loops
    with pytest.raises(ValueError, match="diag_loop_block_k"):
        chunk_diag(
            q, k, b, G, scale=0.3, num=num,
            cfg=dataclasses.replace(SMALL_TILES, diag_loop_block_k=16, diag_store="columns"),
        )  # fmt: skip


@pytest.mark.parametrize("block_k", [16, 32], ids=["two_k_slices", "whole_k"])
def test_levels_diagonal_launch_equals_the_column_loop(block_k):
    """The diagonal launch's two outputs, levels (K in slices of `block_k`) against the column
    loop, at g down to −80 a token (cumulated decays far below float32's range): the same
    blocks to float32 rounding."""
    x = make_inputs(50, Shape(B=1, T=64, H=2, K=32, V=32), extreme=True)
    q, k, b = (jnp.asarray(x[n]) for n in "qkb")
    G = jnp.cumsum(jnp.asarray(x["g"]), axis=1).transpose(0, 2, 1, 3).reshape(2, 64, 32)
    num = numerics_for(jnp.float32, True)
    blocks = [
        chunk_diag(
            q,
            k,
            b,
            G,
            scale=0.3,
            cfg=dataclasses.replace(SMALL_TILES, diag_blocks=m, diag_block_k=block_k),
            num=num,
        )
        for m in ("loop", "levels")
    ]
    assert float(jnp.min(G)) < -500  # exp(-500) is far below float32's smallest number
    for a, want in zip(blocks[1], blocks[0], strict=True):
        assert bool(jnp.all(jnp.isfinite(a)))
        assert rel_err(a, want) <= 1e-6


@pytest.mark.parametrize("dims", [(256, 256), (256, 64), (64, 256)])
def test_chunk_core_at_the_widest_heads_matches_xla_core(dims):
    """K, V = 256: the state passes' V tile shrinks so the [K, BV] state tile keeps its size."""
    K, V = dims
    _assert_core_matches_xla_core(ChunkConfig(), Shape(B=1, T=64, H=1, K=K, V=V), seed=46)


@pytest.mark.parametrize("K", [128, 256])
def test_state_passes_pipeline_only_where_their_tiles_fit(K):
    """Every state pass (forward with its stores, the runs' maps, reverse) keeps the config's
    stages up to K = 128 and runs one stage at K = 256, where two ask for more shared memory
    than a Hopper SM has."""
    x = make_inputs(47, Shape(B=1, T=128, H=1, K=K, V=64))
    args = [jnp.asarray(x[n], jnp.float32 if n == "g" else jnp.bfloat16) for n in NAMES[:6]]
    h0s = jnp.zeros((2, 1, 1, K, 64), jnp.float32)
    cfg = dataclasses.replace(ChunkConfig(), state_parts=2)

    def loss(*a):
        o, _ = pallas_chunk_core(*a, h0s, dense_segments(2), 0.1, 64, cfg, True)
        return o.astype(jnp.float32).sum()

    launches = kernel_launches(jax.grad(loss, argnums=(0,)), *args)
    assert cfg.state.num_stages == cfg.dstate.num_stages == 2
    for name in (
        "gdn2_chunk_fwd_state_save",
        "gdn2_chunk_fwd_part_maps",
        "gdn2_chunk_bwd_part_maps",
        "gdn2_chunk_bwd_dstate",
    ):
        (launch,) = launches[name]
        assert launch.num_stages == (2 if K == 128 else 1), name
        assert launch.num_warps == cfg.state.num_warps, name


@pytest.mark.parametrize("packed", [False, True])
def test_recurrent_entry_point_runs_the_kernel_with_the_scans_gradient(packed):
    """gated_delta_rule2_recurrent(backend="pallas"): kernel forward, scan VJP, same results."""
    x = make_inputs(46, Shape(B=1 if packed else 2, T=19, H=2, K=16, V=32), extreme=True)
    args = [jnp.asarray(x[n]) for n in NAMES[:6]]
    h0 = jnp.asarray(x["initial_state"])
    kw = dict(output_final_state=True, use_qk_l2norm=True)
    if packed:
        kw["cu_seqlens"] = jnp.asarray([0, 5, 5, 19], jnp.int32)
        h0 = jnp.concatenate([h0, 0.5 * h0, -h0])

    def run(backend):
        def loss(*a):
            o, S = gated_delta_rule2_recurrent(
                *a[:6], initial_state=a[6], backend=backend, interpret=True, **kw
            )
            return jnp.sum(o * o) + jnp.sum(jnp.sin(S)), (o, S)

        grads, out = jax.grad(loss, argnums=tuple(range(7)), has_aux=True)(*args, h0)
        return (*out, *grads)

    for a, b in zip(run("pallas"), run("scan"), strict=True):
        assert rel_err(a, b) <= 1e-5


def test_step_on_the_kernel_matches_the_reference_step():
    x = make_inputs(47, Shape(B=2, T=1, H=2, K=32, V=16), extreme=True)
    token = [jnp.asarray(x[n])[:, 0] for n in NAMES[:6]]
    state = jnp.asarray(x["initial_state"])
    o, S = gated_delta_rule2_step(*token, state, backend="pallas", interpret=True)
    o_ref, S_ref = gated_delta_rule2_step(*token, state, backend="scan")
    assert o.shape == o_ref.shape and S.shape == S_ref.shape
    assert rel_err(o, o_ref) <= 1e-5 and rel_err(S, S_ref) <= 1e-5


def test_recurrent_backend_names_are_checked():
    x = make_inputs(48, Shape(B=1, T=3, H=1, K=16, V=16))
    args = [jnp.asarray(x[n]) for n in NAMES[:6]]
    with pytest.raises(ValueError, match="backend"):
        gated_delta_rule2_recurrent(*args, backend="xla")


def test_sixteen_bit_inputs_run_the_split_prep_launches():
    """bf16 inputs take the 16-bit default (the prep split, the diagonal column loop over K
    slices of 32), float32 inputs the fused forward; outputs and every input gradient of both
    close to the float32 XLA op's."""
    x = make_inputs(58, Shape(B=1, T=64, H=2, K=64, V=64))
    f32 = [jnp.asarray(x[n]) for n in NAMES[:6]]
    bf16 = [a if n == "g" else a.astype(jnp.bfloat16) for n, a in zip(NAMES[:6], f32, strict=True)]

    def op(*a):
        return gated_delta_rule2(*a, backend="pallas", interpret=True)

    def core_scans(cfg):
        h0s = jnp.zeros((2, 1, 2, 64, 64), jnp.float32)
        core = functools.partial(pallas_chunk_core, cfg=cfg, interpret=True)
        jaxpr = jax.make_jaxpr(lambda *a: core(*a, h0s, dense_segments(1), 0.125, 64))(*bf16)
        return str(jaxpr).count("scan[")

    launches = {**SPLIT_FORWARD, "gdn2_chunk_fwd_states": 0, "gdn2_chunk_fwd_state": 1}
    names = kernel_names(op, *bf16)
    assert {n: names.get(n, 0) for n in launches} == launches
    # The op's launches loop as the default's do, one loop more than with whole K rows.
    whole_k = dataclasses.replace(DEFAULT_CHUNK_CONFIG, diag_loop_block_k=None)
    op_scans = str(jax.make_jaxpr(op)(*bf16)).count("scan[")
    assert op_scans == core_scans(DEFAULT_CHUNK_CONFIG) == core_scans(whole_k) + 1
    assert kernel_names(op, *f32)["gdn2_chunk_fwd_intra"] == 1
    cot = jnp.asarray(np.random.default_rng(59).standard_normal(x["v"].shape), jnp.float32)

    def out_and_grads(fn, args):
        out, vjp = jax.vjp(lambda *a: fn(*a)[0].astype(jnp.float32), *args)
        return (out, *vjp(cot))

    want = out_and_grads(lambda *a: gated_delta_rule2(*a, backend="xla"), f32)
    # bf16 inputs, output and gradients: each rounding is ~4e-3 relative.
    for name, a, b in zip(("o", *NAMES[:6]), out_and_grads(op, bf16), want, strict=True):
        assert rel_err(a.astype(jnp.float32), b) <= 2e-2, name
    for name, a, b in zip(("o", *NAMES[:6]), out_and_grads(op, f32), want, strict=True):
        assert rel_err(a, b) <= 1e-5, name
