"""Context parallelism through the model, the train step and train.py: a mesh whose "context"
axis splits every sequence gives the single-device losses, gradients and parameters; a context
axis of size 1 traces the same program as a mesh without one; decoding runs under such meshes;
and train.py trains and resumes with `--set mesh.context=4`.

The multi-device checks run in child processes with 8 virtual CPU devices (JAX fixes the device
count when it starts), one child for all the model-level checks.
"""

import json
import sys

import jax
import numpy as np
import pytest
from train_testing import (
    DEFAULT_CONFIG,
    GRADIENTS_IN_ADAM,
    adam_first_moment,
    read_metrics,
    run_python,
    tiny_config,
    tiny_overrides,
    tree_error,
)

from gdn2_jax import sharding, trainer
from gdn2_jax.config import MeshConfig, load_config

# Rows over data, tokens over context: 2 x 2 devices; tokens over context, heads over tensor: 4 x 2.
MESHES = {
    "context2xdata2": (4, ("mesh.data=2", "mesh.context=2")),
    "context4xtensor2": (8, ("mesh.data=1", "mesh.context=4", "mesh.tensor=2")),
}
# The hybrid model's window (12) is longer than a span at context=4 (8 tokens): its halo comes
# from two devices.
MODELS = {"tiny": (), "tiny-hybrid": ("model.block_pattern=gdn2,swa", "model.window_size=12")}
STEP_CASES = (
    "tiny/context2xdata2",
    "tiny/context4xtensor2/packed",
    "tiny-hybrid/context2xdata2/packed",
    "tiny-hybrid/context4xtensor2/packed",
)
# Float32 throughout. The context path runs the op on shorter spans and composes span states
# with float32 matmuls, attention takes a softmax over a haloed or gathered key axis, and
# parameter gradients are summed over devices in another order: rounding only. Measured: ≤ 1.6e-5
# for the worst gradient leaf (A_log, dt_bias: small sums of many terms), as much as one device
# moves by itself from chunk size 16 to 32 (1.4e-5). Resetting every span's first token, or
# dropping the conv halo, moves gradients by 0.67 and the loss by 2e-4 and 1e-3.
STEP_TOL = 1e-4


@pytest.fixture(scope="module")
def child():
    out = run_python([__file__, "child"], num_cpu_devices=8, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", STEP_CASES)
def test_train_step_equals_single_device(child, case):
    """Two steps (the first at learning rate 0 in warm-up, the second updates): loss, grad norm
    and every gradient leaf at both, every parameter after them."""
    r = child["steps"][case]
    assert r["params_replicated_over_context"]
    if "packed" in case:
        # Documents continue across device boundaries, and some start exactly at one.
        assert r["documents_crossing"] > 0 and r["documents_starting_at_span"] > 0
    assert set(r["errors"]) == {"loss", "grad_norm", "grads_1", "grads_2", "params"}
    assert max(r["errors"].values()) < STEP_TOL, r["errors"]


def test_context_of_size_one_traces_the_same_program(child):
    """mesh.context=1 must cost nothing: the train step's jaxpr equals the one on a mesh without
    a context axis, once the mesh descriptions (which name the axis) are set aside."""
    r = child["jaxpr"]
    assert r["size_one_equals_no_axis"]
    assert not r["size_one_ppermutes"]
    # The comparison can fail: a context axis of size 2 changes the program (span hand-overs).
    assert r["size_two_ppermutes"] and not r["size_two_equals_no_axis"]


def test_decoding_and_eval_under_a_context_axis(child):
    """prefill and decode steps keep whole sequences on each device (sizes 1 and 2 of the axis),
    the eval-mode forward of a short input takes the context-parallel chunk form, and the
    token-serial form asked for by `mode="recurrent"` refuses to split tokens."""
    r = child["decoding"]
    # Float32: the same computation replicated over context, or split as in the step cases.
    for name in ("prefill_context1", "decode_context1", "prefill_context2", "decode_context2"):
        assert r[name] < 1e-5, (name, r[name])
    assert r["eval_forward_context2"] < 1e-5
    assert "no context-parallel form" in r["recurrent_mode_error"]


def test_sequence_must_divide_over_the_context_axis(tmp_path):
    mesh = jax.sharding.AbstractMesh((2, 1, 3, 1), sharding.MESH_AXES)
    cfg = tiny_config(tmp_path)
    with pytest.raises(ValueError, match=r"data\.seq_len=32 must divide by mesh\.context=3"):
        trainer.check_batch(cfg, mesh)
    assert tiny_config(tmp_path, "mesh.context=4").mesh.context == 4
    assert sharding.mesh_shape(tiny_config(tmp_path, "mesh.context=4").mesh, 8) == (2, 1, 4, 1)
    assert sharding.batch_spec(mesh) == jax.sharding.PartitionSpec(
        sharding.BATCH_AXES, sharding.CONTEXT_AXIS
    )


def test_train_py_with_context_parallelism_resumes_exactly(tmp_path):
    """train.py on 8 devices as data=2 x context=4: 8 steps straight, and 4 steps (stopped as a
    preempted job) then train.py resuming from the checkpoint, log the same losses bit for bit."""
    common = ("mesh.context=4", "eval.every_steps=4")
    straight = _train_py(tmp_path / "straight", *common)
    resumed = tmp_path / "resumed"
    first = run_python(
        [__file__, "train-until", "4", *tiny_overrides(resumed, *common)], num_cpu_devices=8
    )
    assert first.returncode == 0, first.stderr[-3000:]
    summary = _train_py(resumed, *common)
    assert summary["step"] == 8
    losses = [(r["step"], r["loss"]) for r in read_metrics(resumed)]
    assert losses == [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "straight")]
    assert [s for s, _ in losses] == list(range(1, 9))
    assert summary["eval"] == straight["eval"]


def _train_py(workdir, *extra) -> dict:
    overrides = tiny_overrides(workdir, *extra)
    out = run_python(
        ["train.py", "--config", str(DEFAULT_CONFIG), *[f"--set={o}" for o in overrides]],
        num_cpu_devices=8,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout[out.stdout.index("{") :])


# ---------------------------------------------------------------- child process (8 devices)


def _packed(batch, rng):
    """The batch with segment ids: documents of mean length ~7 tokens, placed at random, their
    ids cycling through 1, 2, 3 (a later document reuses an id: a document is a run of ids)."""
    rows, T = batch["inputs"].shape
    ids = 1 + np.cumsum(rng.random((rows, T)) < 0.15, axis=1) % 3
    return batch | {"segment_ids": ids.astype(np.int32)}


def _document_counts(batches, context):
    """(documents crossing a span boundary, documents starting at a span's first token)."""
    ids = np.concatenate([b["segment_ids"] for b in batches])
    span = ids.shape[1] // context
    first, last = ids[:, span::span], ids[:, span - 1 : -1 : span]
    return int(np.sum(first == last)), int(np.sum(first != last))


def _steps(model, mesh_name, packed):
    """(loss, grad norm, gradient leaves) of two steps and the parameters after them."""
    from gdn2_jax import data

    num_devices, mesh_overrides = MESHES[mesh_name] if mesh_name else (1, ("mesh.data=1",))
    cfg = tiny_config("/unused", *GRADIENTS_IN_ADAM, *MODELS[model], *mesh_overrides)
    mesh = sharding.make_mesh(cfg.mesh, devices=jax.devices()[:num_devices])
    rng = np.random.default_rng(0)
    batches = data.eval_batches(cfg.data, 2)
    batches = [_packed(b, rng) for b in batches] if packed else batches
    out = {"steps": []}
    with jax.set_mesh(mesh):
        run = trainer.build(cfg, mesh)
        state = run.init_fn(jax.random.key(0))
        for batch in batches:
            state, m = run.step_fn(state, sharding.host_local_to_global(batch, mesh))
            mu = adam_first_moment(state.opt_state)
            out["steps"].append((float(m["loss"]), float(m["grad_norm"]), jax.device_get(mu)))
    out["params"] = jax.device_get(state.params)
    specs = [s.spec for s in jax.tree.leaves(jax.tree.map(lambda x: x.sharding, state.params))]
    out["replicated"] = not any(sharding.CONTEXT_AXIS in str(spec) for spec in specs)
    if packed:
        out["counts"] = _document_counts(batches, sharding.context_size(mesh))
    return out


def _step_errors():
    from gdn2_jax.crosscheck import rel_err

    single, results = {}, {}
    for case in STEP_CASES:
        model, mesh_name, *packed = case.split("/")
        if (model, bool(packed)) not in single:
            single[model, bool(packed)] = _steps(model, None, bool(packed))
        want, got = single[model, bool(packed)], _steps(model, mesh_name, bool(packed))
        errors = {"params": tree_error(got["params"], want["params"])}
        errors["loss"] = rel_err([s[0] for s in got["steps"]], [s[0] for s in want["steps"]])
        errors["grad_norm"] = rel_err([s[1] for s in got["steps"]], [s[1] for s in want["steps"]])
        for i in (1, 2):
            errors[f"grads_{i}"] = tree_error(got["steps"][i - 1][2], want["steps"][i - 1][2])
        crossing, starting = got.get("counts", (0, 0))
        results[case] = {
            "errors": errors,
            "params_replicated_over_context": got["replicated"],
            "documents_crossing": crossing,
            "documents_starting_at_span": starting,
        }
    return results


def _step_jaxpr(mesh, cfg) -> str:
    """The train step's jaxpr with the mesh descriptions and the axis name "context" left out of
    axis lists: shard_map lists it among its manual axes even at size 1, and the transpose of a
    replicated input sums over it, as it sums over "fsdp" at size 1 (a sum over one device,
    which XLA removes). A collective over "context" alone would stay."""
    import re

    from gdn2_jax import data

    with jax.set_mesh(mesh):
        run = trainer.build(cfg, mesh)
        batch = _packed(data.eval_batches(cfg.data, 1)[0], np.random.default_rng(0))
        text = str(jax.make_jaxpr(run.step_fn)(run.abstract_state, batch))
    text = re.sub(r"Mesh\([^()]*\([^()]*\)[^()]*\)", "MESH", text)
    text = re.sub(r"\('(\w+)', 'context'\)", r"('\1',)", text.replace("'context', ", ""))
    return text.replace(", 'context'", "")


def _jaxpr_checks():
    cfg = tiny_config("/unused", *MODELS["tiny-hybrid"], "mesh.data=2", "mesh.tensor=2")
    auto = (jax.sharding.AxisType.Auto,) * 3
    no_axis = jax.make_mesh((2, 1, 2), ("data", "fsdp", "tensor"), auto, devices=jax.devices()[:4])
    without = _step_jaxpr(no_axis, cfg)
    size_one = _step_jaxpr(sharding.make_mesh(cfg.mesh, devices=jax.devices()[:4]), cfg)
    cfg2 = tiny_config("/unused", *MODELS["tiny-hybrid"], "mesh.data=2", "mesh.context=2")
    size_two = _step_jaxpr(sharding.make_mesh(cfg2.mesh, devices=jax.devices()[:4]), cfg2)
    return {
        "size_one_equals_no_axis": size_one == without,
        "size_one_ppermutes": "ppermute" in size_one,
        "size_two_equals_no_axis": size_two == without,
        "size_two_ppermutes": "ppermute" in size_two,
    }


def _decoding_checks():
    """Prefill + one decode step, and the eval-mode forward, against the same without a mesh."""
    import jax.numpy as jnp
    from flax import nnx

    from gdn2_jax.crosscheck import rel_err
    from gdn2_jax.layers import GatedDeltaRule2
    from gdn2_jax.model import CausalLM

    cfg = tiny_config("/unused", *MODELS["tiny-hybrid"])
    model = CausalLM(cfg.model, rngs=nnx.Rngs(0))
    model.eval()
    prompt = jax.random.randint(jax.random.key(1), (2, 8), 0, cfg.model.vocab_size)
    tokens = jax.random.randint(jax.random.key(2), (2, 32), 0, cfg.model.vocab_size)

    @jax.jit
    def decode(prompt):
        logits, caches = model.prefill(prompt, max_len=16)
        return logits, model.decode_step(prompt[:, -1], caches)[0]

    want, want_eval = decode(prompt), jax.jit(model)(tokens)
    layer = GatedDeltaRule2(32, 2, 16, mode="recurrent", rngs=nnx.Rngs(0))
    out = {}
    for size in (1, 2):
        mesh = sharding.make_mesh(MeshConfig(data=2, context=size), jax.devices()[: 2 * size])
        with jax.set_mesh(mesh):
            got = decode(prompt)
            out[f"prefill_context{size}"] = rel_err(got[0], want[0])
            out[f"decode_context{size}"] = rel_err(got[1], want[1])
            if size == 2:
                out["eval_forward_context2"] = rel_err(jax.jit(model)(tokens), want_eval)
                try:
                    layer(jnp.ones((2, 8, 32)))
                except NotImplementedError as e:
                    out["recurrent_mode_error"] = str(e)
    return out


if __name__ == "__main__" and sys.argv[1] == "child":
    print(
        json.dumps(
            {"steps": _step_errors(), "jaxpr": _jaxpr_checks(), "decoding": _decoding_checks()}
        )
    )
if __name__ == "__main__" and sys.argv[1] == "train-until":
    trainer.train(load_config(DEFAULT_CONFIG, sys.argv[3:]), until=int(sys.argv[2]))
