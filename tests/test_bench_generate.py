"""benchmarks/bench_generate.py runs on a CPU: the tiny preset at batch 2, ours only."""

import json
import sys

import pytest
from train_testing import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))


def test_bench_generate_runs_the_tiny_preset_on_cpu(tmp_path, capsys):
    import bench_generate

    out = tmp_path / "generate.json"
    bench_generate.main(
        ["--presets", "tiny", "--batches", "2", "--prompt-len", "5", "--new-tokens", "3",
         "--repeats", "1", "--layer-steps", "2", "--dtype", "float32", "--json", str(out),
         "--concat-projections", "off", "on"]
    )  # fmt: skip
    result = json.loads(out.read_text())
    apart, row = result["generate"]
    assert (apart["concat_projections"], row["concat_projections"]) == (False, True)
    assert (row["preset"], row["batch"], row["prompt_len"], row["new_tokens"]) == ("tiny", 2, 5, 3)
    for field in ("prefill_ms", "decode_ms_per_token", "generate_ms", "generate_fn_ms"):
        assert row[field] > 0
    assert row["tokens_per_s"] == pytest.approx(2 * 3 / (row["generate_ms"] / 1e3))
    layers = {r["impl"]: r for r in result["layer_step"]}
    assert list(layers) == ["ours layer step unfused", "ours layer step fused", "ours op step"]
    assert (
        layers["ours layer step unfused"]["step_us"] > 0 and layers["ours op step"]["step_us"] > 0
    )
    assert layers["ours layer step fused"]["step_us"] is None, "no GPU, no interpret mode"
    assert "needs a GPU" in layers["ours layer step fused"]["note"]
    assert "layer step (Triton kernels) is skipped" in capsys.readouterr().out


def test_bench_generate_rejects_one_new_token():
    import bench_generate

    with pytest.raises(SystemExit):
        bench_generate.parse_args(["--new-tokens", "1"])
