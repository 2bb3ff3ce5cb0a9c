"""bench_ops' `--configs` parsing: ChunkConfig strings, ints and launches, and clear errors."""

import sys

import pytest
from train_testing import ROOT

from pallas_kernels import Launch

sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_ops import parse_config


def test_configs_parse_strings_ints_and_launches():
    got = parse_config("structure=split_prep, diag_block_k=64,diag=4:2,state=8")
    assert got == {
        "structure": "split_prep",
        "diag_block_k": 64,
        "diag": Launch(num_warps=4, num_stages=2),
        "state": Launch(num_warps=8, num_stages=1),
    }
    assert parse_config("diag_loop_block_k=16") == {"diag_loop_block_k": 16}
    assert parse_config("diag_loop_block_k=none") == {"diag_loop_block_k": None}


@pytest.mark.parametrize(
    ("text", "match"),
    [("diag_block_k=big", "diag_block_k=big"), ("colour=red", "FIELD one of"), ("diag", "diag")],
)
def test_configs_name_what_is_wrong(text, match):
    with pytest.raises(ValueError, match=match):
        parse_config(text)
