"""benchmarks/bench_train.py runs on a CPU (its tiny preset, ours only), and its PyTorch + fla
peer is the same architecture as ours: the same parameter count, tensor by tensor in sum."""

import json
import sys

import pytest
from flax import nnx
from train_testing import ROOT

from gdn2_jax.model import CausalLM, count_params
from gdn2_jax.model_config import ModelConfig

sys.path.insert(0, str(ROOT / "benchmarks"))


def test_bench_train_runs_the_tiny_preset_on_cpu(tmp_path, capsys):
    import bench_train

    out = tmp_path / "rows.json"
    variant = "loss_chunks=2,remat=true,remat_policy=gdn2_op"
    bench_train.main(
        ["--presets", "tiny-hybrid", "--steps", "1", "--warmup", "1", "--json", str(out),
         "--variants", variant]
    )  # fmt: skip
    rows = json.loads(out.read_text())
    assert [r["impl"] for r in rows] == [f"ours {variant}"]
    for r in rows:
        assert r["preset"] == "tiny-hybrid" and r["shape"] == "2x64"
        assert r["tokens_per_s"] > 0 and r["peak_gib"] > 0 and r["vs_peer"] is None
    assert "peer (Triton kernels) is skipped" in capsys.readouterr().out


def test_bench_train_rejects_a_bad_shape():
    import bench_train

    with pytest.raises(SystemExit, match="--shapes"):
        bench_train.parse_args(["--shapes", "8by2048"])


@pytest.mark.parametrize("preset", ["tiny", "tiny-hybrid"])
def test_peer_has_our_parameter_count(preset):
    pytest.importorskip("fla")
    import torch_peer

    cfg = ModelConfig.preset(preset)
    ours = count_params(nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0))))
    assert torch_peer.count_params(torch_peer.PeerLM(cfg)) == ours
