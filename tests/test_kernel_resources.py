"""benchmarks/kernel_resources.py on a CPU: the op's Pallas launches lowered for an H100 and
compiled by the triton package for sm_90, with their registers and the occupancy they allow."""

import sys

import pytest
from train_testing import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import kernel_resources

pytest.importorskip("triton", reason="the triton package (with ptxas) compiles the kernels")

SPLIT = "structure=split_prep,diag_inverse=doubling"


def test_occupancy_counts_register_allocation_units():
    assert kernel_resources.occupancy(255, 2) == (4, 12.5)  # 256 a thread: 4 programs of 2 warps
    assert kernel_resources.occupancy(96, 4) == (5, 31.25)
    assert kernel_resources.occupancy(32, 1) == (32, 50.0)  # the 32-program cap


def test_forward_launches_and_their_registers(capsys):
    """Every forward launch of the split prep is found by name; the K-sliced levels diagonal on
    4 warps needs fewer registers than the column loop on 2 (the config the GPU call times)."""
    kernel_resources.main(
        ["--forward", "--configs", SPLIT, f"{SPLIT},diag_blocks=levels,diag_block_k=16,diag=4:1"]
    )
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    names = {r[1] for r in rows}
    assert {"gdn2_chunk_fwd_diag", "gdn2_chunk_fwd_solve", "gdn2_chunk_fwd_wy"} <= names
    diag = [int(r[4]) for r in rows if r[1] == "gdn2_chunk_fwd_diag"]
    assert len(diag) == 2 and all(0 < n <= 255 for n in diag)
    assert diag[1] < diag[0]


def test_every_default_launch_fits_the_shared_memory_at_the_largest_heads(capsys):
    """bf16 default, K = V = 256, forward and backward, the state passes in runs: no launch asks
    for more shared memory than a Hopper program may have (two pipeline stages of the state
    passes did, 237-242 KB)."""
    kernel_resources.main(["--heads", "4x256x256", "--configs", "state_parts=2"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    shared = {r[1]: int(r[6]) for r in rows}
    assert {
        "gdn2_chunk_fwd_state_save",
        "gdn2_chunk_bwd_dstate",
        "gdn2_chunk_fwd_part_maps",
    } <= set(shared)
    assert all(0 < n <= kernel_resources.SHARED_PER_SM for n in shared.values()), shared
