"""Meshes and shardings. The multi-device checks run in child processes, because JAX fixes the
number of CPU devices when it starts: 8 virtual devices for the sharded-vs-single-device step,
and two processes joined by jax.distributed for the multi-host run."""

import json
import math
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from testing import kernel_names
from train_testing import (
    DEFAULT_CONFIG,
    ROOT,
    free_port,
    python_env,
    read_metrics,
    run_python,
    tiny_config,
    tiny_overrides,
)

from gdn2_jax import data, ops, sharding, trainer
from gdn2_jax.config import MeshConfig
from gdn2_jax.layers import GatedDeltaRule2
from gdn2_jax.ops import sharded

MESH_2x2x2 = ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")


def test_mesh_shape_resolution():
    assert sharding.MESH_AXES == ("data", "fsdp", "context", "tensor")
    assert sharding.mesh_shape(MeshConfig(), 8) == (8, 1, 1, 1)
    assert sharding.mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=2), 8) == (2, 2, 1, 2)
    assert sharding.mesh_shape(MeshConfig(data=2, context=-1), 8) == (2, 1, 4, 1)
    with pytest.raises(ValueError, match="only one axis may be -1"):
        MeshConfig(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="do not divide"):
        sharding.mesh_shape(MeshConfig(data=-1, tensor=3), 8)
    with pytest.raises(ValueError, match="needs 4 devices, have 8"):
        sharding.mesh_shape(MeshConfig(data=2, fsdp=2), 8)


def test_logical_rules_map_parameters(tmp_path):
    _, abstract = trainer.abstract_model(tiny_config(tmp_path))
    mesh = sharding.make_mesh(MeshConfig())
    specs = jax.tree.map(lambda s: s.spec, sharding.param_shardings(abstract, mesh))
    mixer = specs["blocks"][0]["mixer"]
    assert mixer["q_proj"]["kernel"] == P("fsdp", "tensor")
    assert mixer["o_proj"]["kernel"] == P("tensor", "fsdp")
    assert mixer["A_log"] == P(None)
    assert specs["wte"] == P("tensor", "fsdp")
    assert specs["blocks"][0]["mlp"]["w1"]["kernel"] == P("fsdp", "tensor")
    assert nnx.to_pure_dict(abstract).keys() == specs.keys()


def _sharded_vs_single() -> dict:
    """Child (8 CPU devices): three steps with grad accumulation on a 2x2x2 mesh and on one
    device, from the same init and batches; and the op wrapper against the plain op."""
    results = {}
    for name, mesh_overrides in (("sharded", MESH_2x2x2), ("single", ())):
        cfg = tiny_config("/unused", "optimizer.grad_accum_steps=2", *mesh_overrides)
        devices = jax.devices() if mesh_overrides else jax.devices()[:1]
        mesh = sharding.make_mesh(cfg.mesh, devices=devices)
        with jax.set_mesh(mesh):
            run = trainer.build(cfg, mesh)
            state = run.init_fn(jax.random.key(0))
            kernel = state.params["blocks"][0]["mixer"]["q_proj"]["kernel"]
            results[f"{name}_kernel_shard"] = list(kernel.addressable_shards[0].data.shape)
            losses = []
            for batch in data.eval_batches(cfg.data, 3):
                state, m = run.step_fn(state, sharding.host_local_to_global(batch, mesh))
                losses.append([float(m["loss"]), float(m["grad_norm"])])
        results[name] = losses
        results[f"{name}_params"] = [
            float(np.sum(np.abs(x))) for x in jax.tree.leaves(state.params)
        ]
    results["op_max_error"] = _op_under_mesh_error()
    return results


def _op_under_mesh_error() -> float:
    B, T, H, K = 4, 40, 4, 16
    keys = jax.random.split(jax.random.key(1), 6)
    q, k, v, f, b, w = (jax.random.normal(key, (B, T, H, K)) for key in keys)
    args = (q, k, v, -jax.nn.softplus(f), jax.nn.sigmoid(b), jax.nn.sigmoid(w))
    kw = {"use_qk_l2norm": True, "output_final_state": True}
    want_o, want_s = ops.gated_delta_rule2(*args, **kw)
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    with jax.set_mesh(mesh):
        got_o, got_s = jax.jit(lambda *a: sharded.gated_delta_rule2(*a, **kw))(*args)
    return float(max(np.abs(got_o - want_o).max(), np.abs(got_s - want_s).max()))


def _layer_kernels_under_mesh() -> dict:
    """Child (8 CPU devices): the layer's chunk, token-serial and decoding-step paths under a
    2x2x2 mesh, the kernels each traced program runs inside shard_map, and the largest
    difference from the same layer without a mesh."""
    train = GatedDeltaRule2(32, 4, 16, interpret=True, rngs=nnx.Rngs(0))
    infer = GatedDeltaRule2(32, 4, 16, interpret=True, rngs=nnx.Rngs(0))
    infer.eval()
    x = jax.random.normal(jax.random.key(2), (4, 70, 32))
    cache = infer.init_cache(4)
    programs = {
        "chunk": lambda x: train(x),
        "short_eval": lambda x: infer(x[:, :20]),
        "step": lambda x: infer.step(x[:, 0], cache)[0],
    }
    plain = {name: fn(x) for name, fn in programs.items()}
    out = {}
    with jax.set_mesh(sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))):
        for name, fn in programs.items():
            out[name] = {
                "kernels": dict(kernel_names(fn, x)),
                "shard_map": "shard_map" in str(jax.make_jaxpr(fn)(x)),
                "error": float(np.abs(jax.jit(fn)(x) - plain[name]).max()),
            }
    return out


def test_layer_paths_run_their_kernels_per_shard():
    child = run_python([__file__, "layer-under-mesh"], num_cpu_devices=8)
    assert child.returncode == 0, child.stderr[-3000:]
    r = json.loads(child.stdout.strip().splitlines()[-1])
    assert r["chunk"]["kernels"] == {
        "gdn2_chunk_fwd_diag": 1,
        "gdn2_chunk_fwd_intra": 1,
        "gdn2_chunk_fwd_state": 1,
    }
    assert r["short_eval"]["kernels"] == {"gdn2_recurrent_fwd": 1}
    assert r["step"]["kernels"] == {"gdn2_recurrent_fwd": 1}
    for name, result in r.items():
        assert result["shard_map"], f"{name}: the op must run per shard"
        # float32; sharding splits batch and heads, which never mix in the recurrence.
        assert result["error"] < 1e-5, name


def test_sharded_step_equals_single_device():
    child = run_python([__file__, "sharded-vs-single"], num_cpu_devices=8)
    assert child.returncode == 0, child.stderr[-3000:]
    r = json.loads(child.stdout.strip().splitlines()[-1])
    # The 2x2x2 mesh really splits parameters: q_proj [32, 32] is [16, 16] per device.
    assert r["sharded_kernel_shard"] == [16, 16] and r["single_kernel_shard"] == [32, 32]
    # Float32 sums run in a different order across shards; nothing else may differ.
    np.testing.assert_allclose(r["sharded"], r["single"], rtol=2e-5)
    np.testing.assert_allclose(r["sharded_params"], r["single_params"], rtol=1e-4)
    assert r["op_max_error"] < 1e-5


def test_two_processes_with_jax_distributed(tmp_path):
    """Two local processes of 2 CPU devices each form one 4-device job through
    jax.distributed; both must finish and write one shared checkpoint. The job computes in
    bfloat16 (over float32 parameters), as a GPU job would."""
    port = free_port()
    common = tiny_overrides(
        tmp_path, "train.steps=3", "checkpoint.every_steps=2", "model.dtype=bfloat16"
    )
    common += [
        "train.distributed=true",
        f"train.coordinator_address=localhost:{port}",
        "train.num_processes=2",
    ]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "train.py",
                "--config",
                str(DEFAULT_CONFIG),
                *[f"--set={o}" for o in [*common, f"train.process_id={i}"]],
            ],
            cwd=ROOT,
            env=python_env(2),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    # Loss starts near ln(32) (uniform over the vocabulary) and stays finite in bfloat16.
    assert all(math.isfinite(r["loss"]) and 2.0 < r["loss"] < 5.0 for r in rows)
    final = tmp_path / "checkpoints" / "3" / "data"
    assert sorted(f.name for f in final.glob("*.json")) == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]


if __name__ == "__main__":
    if sys.argv[1] == "sharded-vs-single":
        print(json.dumps(_sharded_vs_single()))
    if sys.argv[1] == "layer-under-mesh":
        print(json.dumps(_layer_kernels_under_mesh()))
