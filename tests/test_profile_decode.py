"""benchmarks/profile_decode.py runs on a CPU: the tiny preset's decode loop, its host ops."""

import json
import sys

import pytest
from train_testing import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))


def test_profile_decode_reads_the_decode_loop_from_a_trace(tmp_path, capsys):
    import profile_decode

    out = tmp_path / "decode.json"
    profile_decode.main(
        ["--preset", "tiny", "--batch", "2", "--prompt-len", "5", "--steps", "3",
         "--dtype", "float32", "--json", str(out)]
    )  # fmt: skip
    s = json.loads(out.read_text())
    assert (s["preset"], s["batch"]) == ("tiny", 2)
    assert s["launches_per_step"] >= 1 and s["busy_us_per_step"] > 0
    names = [g["name"] for g in s["groups"]]
    assert "while" not in names, "the loop's own event spans its body's ops: not counted"
    # The tiny model's two blocks each run their projections as dots in every step.
    assert sum(g["per_step"] for g in s["groups"] if "dot" in g["name"]) >= 2
    assert "launches, " in capsys.readouterr().out


def test_profile_decode_reads_the_prefill_with_prefill(tmp_path, capsys):
    """--prefill: the launches of the prefill program (the prompt's chunked forward), once."""
    import profile_decode

    out = tmp_path / "prefill.json"
    profile_decode.main(
        ["--preset", "tiny", "--batch", "2", "--prompt-len", "70", "--prefill",
         "--dtype", "float32", "--json", str(out)]
    )  # fmt: skip
    s = json.loads(out.read_text())
    assert (s["unit"], s["prompt_len"]) == ("prefill", 70)
    assert s["busy_us_per_step"] > 0
    assert sum(g["per_step"] for g in s["groups"] if "dot" in g["name"]) >= 2
    assert "per prefill: " in capsys.readouterr().out


def test_profile_decode_needs_a_positive_step_count():
    import profile_decode

    with pytest.raises(SystemExit):
        profile_decode.parse_args(["--steps", "0"])
