"""`python -m gdn2_jax.evaluate`: scores a checkpoint that the trainer wrote from
configs/recall_tiny.py (shrunk, a few steps), with the model's own greedy answers."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
from train_testing import tiny_config

from gdn2_jax import evaluate, niah, trainer


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("recall_tiny")
    trainer.train(tiny_config(path, "checkpoint.async_save=false"))
    return path


def test_command_scores_every_task_and_length(workdir, tmp_path, capsys):
    out = tmp_path / "niah.json"
    argv = ["--checkpoint", str(workdir), "--suite", "niah", "--lengths", "16,24"]
    assert evaluate.main([*argv, "--samples", "3", "--batch-size", "4", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["step"] == 8 and record["tokenizer"] == "RecallFormat"
    assert list(record["results"]) == list(niah.TASKS)
    for by_length in record["results"].values():
        assert list(by_length) == ["16", "24"]
        for cell in by_length.values():
            assert len(cell["correct"]) == 3
            assert cell["accuracy"] == pytest.approx(np.mean(cell["correct"]))
    printed = capsys.readouterr().out
    assert "| task | 16 | 24 |" in printed and "| mk_niah_1 |" in printed


def test_answers_are_the_models_greedy_tokens(workdir):
    """The first generated token is the argmax of the model's logits at the prompt's end, and
    a cell's score is the exact match of those tokens with the answers."""
    cfg, model, step = evaluate.load(workdir)
    assert step == 8
    fmt = evaluate.prompt_format(cfg)
    batch = niah.samples(fmt, ("s_niah_2", "mk_niah_1"), 20, 3, seed=5)
    generated = evaluate.answer_all(model, batch, batch_size=8)
    logits = model(jnp.asarray(np.stack([s.prompt for s in batch])))
    np.testing.assert_array_equal(generated[:, 0], np.argmax(logits[:, -1], axis=-1))
    results = evaluate.evaluate(
        model, fmt, ("s_niah_2", "mk_niah_1"), (20,), samples=3, batch_size=8, seed=5,
        progress=False,
    )  # fmt: skip
    hits = [g[0] == s.answer[0] for s, g in zip(batch, generated, strict=True)]
    assert results["s_niah_2"][20]["correct"] + results["mk_niah_1"][20]["correct"] == hits


def test_refusals_name_the_argument(workdir, tmp_path, capsys):
    assert evaluate.main(["--checkpoint", str(tmp_path / "none"), "--lengths", "16"]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    assert evaluate.main(["--checkpoint", str(workdir), "--step", "3", "--lengths", "16"]) == 2
    assert "--step 3" in capsys.readouterr().err
    assert evaluate.main(["--checkpoint", str(workdir), "--lengths", "4"]) == 2
    assert "length 4 is too short" in capsys.readouterr().err
    argv = ["--checkpoint", str(workdir), "--lengths", "16", "--set", "model.gdn2_backend=fast"]
    assert evaluate.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model.gdn2_backend=fast: 'fast' is")
    cfg = tiny_config(tmp_path)
    tokens = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, kind="tokens"))
    with pytest.raises(ValueError, match="--checkpoint: the model was trained on token files"):
        evaluate.prompt_format(tokens)
