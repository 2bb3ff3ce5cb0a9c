"""The train step and loop: a golden one-step check, gradient accumulation, the weight-decay
mask, bfloat16 compute over float32 parameters, the NaN/Inf stop, and the command line with its
logging and evals."""

import dataclasses
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from train_testing import DEFAULT_CONFIG, read_metrics, run_python, tiny_config, tiny_overrides

from gdn2_jax import data, metrics, optim, sharding, trainer
from gdn2_jax.config import MeshConfig

# Produced by running `_golden_run()` below on CPU (JAX 0.11.2, float32) at the commit that
# added this test, and pasting its output. A change to the recall generator, model init,
# forward pass, loss, clipping or AdamW update moves these numbers and must fail the test; if
# the change is intended, re-record them and say why in the commit message. The tolerance only
# absorbs float32 reduction-order differences between CPUs.
GOLDEN = {
    "loss_1": 3.7004473209381104,
    "grad_norm_1": 12.146960258483887,
    "loss_3": 3.0257725715637207,
}
GOLDEN_RTOL = 1e-4


def _single_device_run(cfg):
    mesh = sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        run = trainer.build(cfg, mesh)
        state = run.init_fn(jax.random.key(cfg.train.seed))
    return mesh, run, state


def _golden_run(workdir, *overrides: str) -> dict[str, float]:
    """Loss and gradient norm of the first step on fixed data, and the loss at the third step
    (the first step's learning rate is 0 in warm-up, so step 3 is the first to see an update)."""
    cfg = tiny_config(workdir, *overrides)
    mesh, run, state = _single_device_run(cfg)
    batch = data.eval_batches(cfg.data, 1)[0]
    out = {}
    with jax.set_mesh(mesh):
        for i in (1, 2, 3):
            state, m = run.step_fn(state, sharding.host_local_to_global(batch, mesh))
            out |= {f"loss_{i}": float(m["loss"]), f"grad_norm_{i}": float(m["grad_norm"])}
    return {k: out[k] for k in GOLDEN}


def test_golden_one_step(tmp_path):
    got = _golden_run(tmp_path)
    print("golden:", got)
    for key, expected in GOLDEN.items():
        assert math.isclose(got[key], expected, rel_tol=GOLDEN_RTOL), (key, got[key], expected)


def test_chunked_loss_and_remat_policy_keep_the_golden_step(tmp_path):
    """How the step computes (the loss in 3 chunks of positions, blocks rematerialized keeping
    matmul outputs and the op's residuals) moves no golden number beyond reduction order."""
    got = _golden_run(
        tmp_path, "model.loss_chunks=3", "model.remat=true", "model.remat_policy=dots_and_gdn2_op"
    )
    for key, expected in GOLDEN.items():
        assert math.isclose(got[key], expected, rel_tol=GOLDEN_RTOL), (key, got[key], expected)


def test_grad_accumulation_matches_full_batch(tmp_path):
    """Two micro-batches of 4 rows give the full 8-row step: same loss, gradient and update."""
    cfg = tiny_config(tmp_path)
    batch = data.eval_batches(cfg.data, 1)[0]
    results = []
    for accum in (1, 2):
        acc_cfg = dataclasses.replace(
            cfg, optimizer=dataclasses.replace(cfg.optimizer, grad_accum_steps=accum)
        )
        mesh, run, state = _single_device_run(acc_cfg)
        with jax.set_mesh(mesh):
            results.append(run.step_fn(state, sharding.host_local_to_global(batch, mesh)))
    (full_state, full), (acc_state, acc) = results
    for key in ("loss", "grad_norm", "accuracy", "tokens"):
        np.testing.assert_allclose(acc[key], full[key], rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        acc_state.params,
        full_state.params,
    )


def test_weight_decay_mask(tmp_path):
    """With zero gradients AdamW's update is the decay alone: matrices shrink, while A_log,
    dt_bias, norm scales and biases do not move."""
    _, abstract_params = trainer.abstract_model(tiny_config(tmp_path))
    params = jax.tree.map(lambda x: jnp.ones(x.shape, x.dtype), nnx.to_pure_dict(abstract_params))
    cfg = optim.OptimizerConfig(lr=1.0, warmup_steps=0, weight_decay=0.5, clip_norm=1.0)
    optimizer, _ = optim.make_optimizer(cfg, total_steps=10)

    @jax.jit
    def first_update(params):
        grads = jax.tree.map(jnp.zeros_like, params)
        return optimizer.update(grads, optimizer.init(params), params)[0]

    flat = jax.tree_util.tree_flatten_with_path(first_update(params))[0]
    moved = {jax.tree_util.keystr(p) for p, u in flat if np.any(np.asarray(u) != 0)}
    static = {jax.tree_util.keystr(p) for p, u in flat} - moved
    assert "['blocks'][0]['mixer']['q_proj']['kernel']" in moved
    assert "['blocks'][0]['mlp']['w1']['kernel']" in moved
    assert "['wte']" in moved and "['lm_head']" in moved
    for name in ("A_log", "dt_bias", "o_norm", "norm_1", "norm_2", "ln_f", "bias"):
        assert any(name in p for p in static), name
    assert not [p for p in moved if any(n in p for n in ("A_log", "dt_bias", "norm", "bias"))]


def test_bfloat16_compute_keeps_float32_master_params(tmp_path):
    cfg = tiny_config(tmp_path, "model.dtype=bfloat16")
    mesh = sharding.make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        run = trainer.build(cfg, mesh)
    dtypes = {x.dtype for x in jax.tree.leaves(run.abstract_state.params)}
    assert dtypes == {jnp.dtype(jnp.float32)}
    opt_dtypes = {x.dtype for x in jax.tree.leaves(run.abstract_state.opt_state)}
    assert opt_dtypes <= {jnp.dtype(jnp.float32), jnp.dtype(jnp.int32)}
    tokens = data.eval_batches(cfg.data, 1)[0]["inputs"]

    def forward(params, tokens):
        model = nnx.merge(run.graphdef, params)
        return model.embed(tokens), model(tokens)

    hidden, logits = jax.eval_shape(forward, run.abstract_state.params, tokens)
    assert hidden.dtype == jnp.bfloat16 and logits.dtype == jnp.float32


def test_packed_documents_reset_the_model(tmp_path):
    """Token files are packed into windows whose segment ids reach the model: a document that
    starts mid-window gets the same logits as when it starts a row of its own."""
    cfg = tiny_config(tmp_path)
    rng = np.random.default_rng(0)
    eos, T, start = 0, cfg.data.seq_len, 11
    stream = rng.integers(1, cfg.model.vocab_size, size=2 * T + 1)
    stream[start - 1] = eos  # document 2 starts at `start`
    packed_row = data.pack_window(stream[: T + 1], eos)
    alone_row = data.pack_window(stream[start : start + T + 1], eos)
    batch = {k: np.stack([packed_row[k], alone_row[k]]) for k in ("inputs", "segment_ids")}
    assert batch["segment_ids"][0, start] == batch["segment_ids"][0, start - 1] + 1
    _, run, state = _single_device_run(cfg)

    @jax.jit
    def logits(params, inputs, segment_ids):
        return nnx.merge(run.graphdef, params)(inputs, segment_ids=segment_ids)

    out = np.asarray(logits(state.params, batch["inputs"], batch["segment_ids"]))
    np.testing.assert_allclose(out[0, start:], out[1, : T - start], rtol=1e-4, atol=1e-5)
    # Without the segment ids, document 1 leaks into document 2.
    leaky = np.asarray(logits(state.params, batch["inputs"], None))
    assert np.abs(leaky[0, start:] - out[1, : T - start]).max() > 1e-3


def test_schedule_warms_up_then_decays():
    cfg = dataclasses.replace(optim.OptimizerConfig(), lr=1.0, warmup_steps=10, final_lr_ratio=0.1)
    schedule = optim.make_schedule(cfg, total_steps=100)
    assert float(schedule(0)) == 0.0
    assert math.isclose(float(schedule(10)), 1.0, rel_tol=1e-6)
    assert math.isclose(float(schedule(100)), 0.1, rel_tol=1e-5)
    assert float(schedule(50)) < float(schedule(20))


def test_flops_per_token_counts_matmuls_and_mixers(tmp_path):
    cfg = tiny_config(tmp_path)
    _, params = trainer.abstract_model(cfg)
    flops = metrics.train_flops_per_token(cfg.model, cfg.data.seq_len, nnx.to_pure_dict(params))
    m = cfg.model
    d, key, head_v, conv = m.hidden_size, 32, 16, 4  # key = 2 heads x 16 = value width
    per_block = (
        3 * d * key  # q, k, v projections
        + 2 * (d * head_v + head_v * key)  # f_proj and g_proj low-rank pairs
        + 2 * d * key  # b_proj, w_proj
        + key * d  # o_proj
        + 3 * conv * key  # depthwise short convolutions
        + 3 * d * m.intermediate_size  # SwiGLU
    )
    matmul = m.num_layers * per_block + m.hidden_size * m.vocab_size
    mixer = metrics.gdn2_flops_per_token(2, 16, 16, 16)
    assert flops == 6 * matmul + 3 * m.num_layers * mixer
    assert metrics.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert metrics.peak_flops("cpu") is None


def _diverge_at(monkeypatch, bad_step: int, metric: str, value: float) -> None:
    """Makes every step from `bad_step` on report `metric` as `value` (NaN or Inf), with the
    train state poisoned too, as a real divergence would leave it. Wrapping the built step keeps
    the compiled programs the other tests use."""
    real_build = trainer.build

    def build(cfg, mesh):
        run = real_build(cfg, mesh)
        step_fn = run.step_fn

        def diverging(state, batch):
            state, metrics = step_fn(state, batch)
            if int(state.step) >= bad_step:
                metrics = dict(metrics, **{metric: jnp.float32(value)})
                state = state.replace(params=jax.tree.map(lambda x: x * value, state.params))
            return state, metrics

        return dataclasses.replace(run, step_fn=diverging)

    monkeypatch.setattr(trainer, "build", build)


@pytest.mark.parametrize("metric,value", [("loss", math.nan), ("grad_norm", math.inf)])
def test_divergence_stops_and_keeps_last_good_checkpoint(
    tmp_path, monkeypatch, capsys, metric, value
):
    _diverge_at(monkeypatch, 3, metric, value)
    cfg = tiny_config(tmp_path, "checkpoint.every_steps=2")
    expected = re.escape(f"diverged at step 3: {{'{metric}'") + ".*checkpoint is step 2 in"
    with pytest.raises(trainer.TrainingDivergedError, match=expected):
        trainer.train(cfg)
    ckpt_dir = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["2"]
    # The kept checkpoint is usable: a run without the fault resumes from it and finishes.
    monkeypatch.undo()
    summary = trainer.train(cfg)
    assert summary["step"] == 8 and math.isfinite(summary["train"]["loss"])
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 6, 7, 8]
    # Without a progress bar each log step is a line of the run's output.
    assert re.search(r"^step 8: train .* loss=", capsys.readouterr().out, re.M)


def test_vocab_mismatch_is_refused(tmp_path):
    cfg = tiny_config(tmp_path, "data.recall.vocab_size=64")
    with pytest.raises(ValueError, match=r"model\.vocab_size=32"):
        trainer.train(cfg)


def test_batch_that_does_not_split_is_refused(tmp_path):
    cfg = tiny_config(tmp_path, "optimizer.grad_accum_steps=3")
    with pytest.raises(ValueError, match=r"batch_size=8 must split into .*=3 micro-batches"):
        trainer.train(cfg)


def test_command_line_trains_logs_and_evaluates(tmp_path):
    """train.py end to end: JSONL and TensorBoard metrics, tokens/s and MFU, periodic evals with
    recall accuracy, the final checkpoint and the JSON summary."""
    overrides = tiny_overrides(
        tmp_path,
        "eval.every_steps=4",
        "logging.tensorboard=true",
        "logging.progress_bar=true",
        "logging.peak_flops_per_device=1e12",
        "checkpoint.every_steps=4",
    )
    ok = run_python(
        ["train.py", "--config", str(DEFAULT_CONFIG), *[f"--set={o}" for o in overrides]]
    )
    assert ok.returncode == 0, ok.stderr
    summary = json.loads(ok.stdout[ok.stdout.index("{") :])
    assert summary["step"] == 8
    assert set(summary["eval"]) == {"loss", "perplexity", "recall_accuracy"}
    train_rows, eval_rows = read_metrics(tmp_path), read_metrics(tmp_path, "eval")
    assert [r["step"] for r in train_rows] == list(range(1, 9))
    assert [r["step"] for r in eval_rows] == [4, 8]
    assert eval_rows[-1]["loss"] == summary["eval"]["loss"]
    # The first step's row has no throughput (it includes compilation); the others do.
    assert {"loss", "grad_norm", "lr", "tokens_per_s", "mfu"} <= set(train_rows[-1])
    assert 0 < train_rows[-1]["mfu"] < 1
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["4", "8"]
    assert "step 4: eval loss=" in ok.stdout and "tok/s=" in ok.stderr  # the progress bar
    bad = run_python(["train.py", "--config", str(DEFAULT_CONFIG), "--set", "optimizer.lr=x"])
    assert bad.returncode == 2 and "optimizer.lr=x: expected a float" in bad.stderr
