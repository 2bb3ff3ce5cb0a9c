"""The gate ablation: matched parameter counts, the vmapped seeds train as separate runs would,
and the JSON, intervals and table it reports."""

import json
import math
import sys

import numpy as np
import pytest
import scipy.stats
from train_testing import ROOT

from gdn2_jax import ablation


def test_variants_match_gdn2_parameter_count():
    cfg = ablation.preset("h200")
    target = ablation.param_count(cfg.model)
    per_unit = 3 * cfg.model.hidden_size * cfg.model.num_layers  # one more MLP width unit
    for variant in ablation.VARIANTS:
        model = ablation.variant_model(cfg, variant)
        assert model.gate_mode == ablation.VARIANTS[variant][0]
        assert abs(ablation.param_count(model) - target) <= per_unit / 2
    # The tied gates lose the b and w projections, so their MLP is wider.
    assert ablation.variant_model(cfg, "kda").intermediate_size > cfg.model.intermediate_size


def test_seeds_train_together_as_they_would_alone(tmp_path):
    cfg = ablation.preset("tiny", steps=4, eval_every=2, variants=("gdn",))
    two = ablation.run(cfg.replace(seeds=2), tmp_path / "two.json", progress=False)
    one = ablation.run(cfg.replace(seeds=1), None, progress=False)
    a, b = two["runs"][0], one["runs"][0]
    np.testing.assert_allclose(np.asarray(a["train_loss"])[0], b["train_loss"][0], rtol=1e-5)
    for task in a["eval_accuracy"]:
        np.testing.assert_allclose(a["eval_accuracy"][task][0], b["eval_accuracy"][task][0])
    # Seed 1 trains on its own data stream and initialisation.
    assert a["train_loss"][0] != a["train_loss"][1]
    stored = json.loads((tmp_path / "two.json").read_text())
    assert stored["runs"][0]["eval_steps"] == [2, 4]
    assert set(stored["runs"][0]["final_accuracy"]) == {"mqar", "overwrite", "mk_needle"}


def _fake_results(finals: dict[str, list[float]]) -> dict:
    runs = [
        {"variant": v, "params": 1000, "final_accuracy": {"mqar": acc},
         "final_mean_accuracy": acc}
        for v, acc in finals.items()
    ]  # fmt: skip
    return {"runs": runs}


def test_intervals_table_and_ordering():
    results = _fake_results(
        {"kda": [0.50, 0.52, 0.51], "gdn2": [0.80, 0.82, 0.78], "gdn": [0.49, 0.55, 0.50]}
    )
    mean, half = ablation.interval([0.80, 0.82, 0.78])
    lo, hi = scipy.stats.t.interval(0.95, 2, loc=0.8, scale=scipy.stats.sem([0.80, 0.82, 0.78]))
    assert mean == pytest.approx(0.8) and half == pytest.approx((hi - lo) / 2)
    assert math.isnan(ablation.interval([0.5])[1])
    assert ablation.ordering(results) == "gdn2 > gdn ~ kda"
    table = ablation.markdown_table(results)
    assert table.splitlines()[2].startswith(f"| gdn2 | 1,000 | 80.0 ± {100 * half:.1f} |")


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match=r"AblationConfig\.variants"):
        ablation.preset("tiny", variants=("gdn3",))
    with pytest.raises(ValueError, match=r"AblationConfig\.seeds"):
        ablation.preset("tiny", seeds=0)
    with pytest.raises(ValueError, match="unknown ablation preset"):
        ablation.preset("huge")


def _part(variants: tuple[str, ...], **config_changes) -> dict:
    cfg = ablation.preset("tiny", variants=variants, **config_changes)
    runs = [{"variant": v, "train_loss": [[1.234567, 0.5]]} for v in variants]
    return {"config": ablation.config_dict(cfg), "device": "cpu", "date": "d", "runs": runs}


def test_merge_joins_variants_run_in_pieces_and_refuses_different_runs():
    merged = ablation.merge([_part(("gdn2", "kda")), _part(("gdn",))])
    assert [r["variant"] for r in merged["runs"]] == ["gdn2", "kda", "gdn"]
    assert merged["config"]["variants"] == ["gdn2", "kda", "gdn"]
    assert merged["runs"][0]["train_loss"] == [[1.2346, 0.5]]
    with pytest.raises(ValueError, match=r"differ in \['steps'\]"):
        ablation.merge([_part(("gdn2",)), _part(("kda",), steps=13)])
    with pytest.raises(ValueError, match="repeat variants"):
        ablation.merge([_part(("gdn2",)), _part(("gdn2",))])


def test_command_line_overrides_reach_the_config_and_bad_ones_exit_2(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gate_ablation

    argv = ["--preset", "tiny", "--out", str(tmp_path)]
    args = gate_ablation.parse_args([*argv, "--rows", "3", "--steps", "5", "--lr", "0.01"])
    cfg = gate_ablation.config_from(args)
    assert (cfg.batch_size, cfg.steps, cfg.optimizer.lr) == (3, 5, 0.01)
    assert gate_ablation.main([*argv, "--rows", "0"]) == 2
    assert "AblationConfig.batch_size must be >= 1" in capsys.readouterr().err
