"""benchmarks/bench_scaling.py: every mesh layout it measures runs the single-device train step
(loss, gradients, parameters after the step) on 8 virtual CPU devices; its plan, efficiencies
and communication times from profiler traces; and a run through its one-process-per-device
launcher (jax.distributed).

The 8-device checks run in a child process: JAX fixes the device count when it starts.
"""

import dataclasses
import json
import sys

import jax
import numpy as np
import pytest
from jax.profiler import ProfileData
from train_testing import (
    GRADIENTS_IN_ADAM,
    ROOT,
    adam_first_moment,
    run_python,
    tiny_config,
    tree_error,
)

sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_scaling
import collectives

# One GDN-2 and one sliding-window block; at context=8 a span is 4 tokens, so the window (12)
# takes its halo from three devices. (The single-device run is test_context_train.py's, so a
# whole-suite run compiles it once.)
MODEL = ("model.block_pattern=gdn2,swa", "model.window_size=12")
# Two steps: the first at learning rate 0 (warm-up), the second updates the parameters.
STEPS = 2
# Float32. The layouts split rows, parameters, heads or tokens; each changes only the order of
# float32 sums (gradients over rows and devices, the context path's span states): rounding.
# Measured on 8 CPU devices: loss <= 1.1e-7, the worst gradient leaf 1.05e-6 (context), the
# worst parameter leaf 5.4e-7; the two steps move the parameters by 7.5e-3 (relative, all
# leaves together), so a layout that drops or doubles a gradient is far outside 1e-5.
TOL = 1e-5


@pytest.fixture(scope="module")
def layouts():
    out = run_python([__file__, "layouts"], num_cpu_devices=8, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("layout", bench_scaling.LAYOUTS)
def test_layout_step_equals_single_device(layouts, layout):
    r = layouts[layout]
    assert r["devices"] == 8
    assert r["errors"]["params_moved"] > 100 * TOL, r["errors"]  # the steps did update
    for name in ("loss", "grads", "params"):
        assert r["errors"][name] < TOL, (name, r["errors"])


def test_layouts_split_what_they_name(layouts):
    """The comparison can fail only if the layouts really split: each one's parameter and
    batch shardings use its mesh axes."""
    assert layouts["data"]["param_axes"] == [] and layouts["data"]["batch_axes"] == ["data"]
    assert layouts["fsdp"]["param_axes"] == ["fsdp"]
    assert layouts["fsdp_tensor"]["param_axes"] == ["fsdp", "tensor"]
    assert layouts["fsdp_tensor"]["mesh"] == {"data": 1, "fsdp": 4, "context": 1, "tensor": 2}
    assert layouts["context"]["batch_axes"] == ["context"]
    assert layouts["context"]["param_axes"] == []


def _args(*argv):
    return bench_scaling.parse_args(["--presets", "tiny", *argv, "--devices", "1"])


def test_plan_scales_rows_for_batch_layouts_and_keeps_the_context_sequence():
    args = _args("--shape", "2x64", "--context-shapes", "1x256")
    args.devices = [1, 2, 8]
    cases = {(c.layout, c.devices): (c.batch, c.seq_len) for c in bench_scaling.plan(args)}
    assert cases["fsdp", 8] == (16, 64) and cases["data", 2] == (4, 64)
    assert cases["fsdp_tensor", 2] == (4, 64) and cases["context", 8] == (1, 256)
    singles = [c for c in bench_scaling.plan(args) if c.layout == bench_scaling.SINGLE]
    assert sorted((c.scaling, c.batch, c.seq_len) for c in singles) == [
        ("strong", 1, 256),
        ("weak", 2, 64),
    ]
    assert bench_scaling.layout_mesh("fsdp_tensor", 8, 4) == bench_scaling.MeshConfig(
        data=1, fsdp=2, tensor=4
    )
    with pytest.raises(ValueError, match="--tensor=3 must be >= 2 and divide 8"):
        bench_scaling.layout_mesh("fsdp_tensor", 8, 3)


def test_efficiency_is_per_device_throughput_over_the_matching_single_run():
    def row(layout, devices, shape, scaling, tps):
        return bench_scaling.Row(
            preset="p", layout=layout, devices=devices, processes=1, shape=shape, mesh="-",
            scaling=scaling, status="ok", tokens_per_s_per_device=tps,
        )  # fmt: skip

    rows = [
        row("single", 1, "2x64", "weak", 100.0),
        row("single", 1, "1x256", "strong", 50.0),
        row("fsdp", 4, "8x64", "weak", 90.0),
        row("context", 4, "1x256", "strong", 40.0),
        dataclasses.replace(row("data", 4, "8x64", "weak", None), status="out of memory: x"),
    ]
    out = bench_scaling.with_efficiency(rows)
    assert out[2].efficiency == pytest.approx(0.9) and out[2].speedup == pytest.approx(3.6)
    assert out[3].efficiency == pytest.approx(0.8) and out[3].speedup == pytest.approx(3.2)
    assert out[0].efficiency == 1.0 and out[4].efficiency is None


def _xspace(planes: str) -> ProfileData:
    return ProfileData.from_serialized_xspace(ProfileData.text_proto_to_serialized_xspace(planes))


def _plane(name, lines, names):
    """A device plane; `lines` maps a line name to (event metadata id, duration ps, hlo_op)."""
    body = "".join(
        f'lines {{ name: "{line}" '
        + "".join(
            f"events {{ metadata_id: {m} offset_ps: {i * 10**9} duration_ps: {d}"
            + (f' stats {{ metadata_id: 99 str_value: "{op}" }}' if op else "")
            + " }"
            for i, (m, d, op) in enumerate(events)
        )
        + " } "
        for line, events in lines.items()
    )
    meta = "".join(f'event_metadata {{ key: {k} value {{ id: {k} name: "{v}" }} }} '
                   for k, v in names.items())  # fmt: skip
    stat = 'stat_metadata { key: 99 value { id: 99 name: "hlo_op" } }'
    return f'planes {{ name: "{name}" {body} {meta} {stat} }}'


def test_communication_time_sums_collectives_per_device():
    names = {1: "ncclDevKernel_AllReduce_Sum_f32", 2: "loop_fusion_3", 3: "gemm_kernel",
             4: "all-gather-start.2", 5: "fusion.1"}  # fmt: skip
    gpu0 = _plane("/device:GPU:0", {
        "Stream #13(compute)": [(2, 5000, None), (1, 2000, "all-reduce-start.1")],
        "Stream #14(nccl)": [(3, 7000, "collective-permute-start.4"), (3, 3000, "dot.2")],
    }, names)  # fmt: skip
    # Where xprof's "XLA Ops" line exists, the kernel lines repeat it: only it counts.
    gpu1 = _plane("/device:GPU:1", {
        "XLA Ops": [(4, 4000, None), (5, 9000, None)],
        "Stream #13(compute)": [(1, 4000, "all-gather-start.2")],
    }, names)  # fmt: skip
    host = _plane("/host:CPU", {"python": [(1, 10**6, None)]}, names)
    totals = collectives.communication_ns(_xspace(gpu0 + gpu1 + host))
    assert totals == {"/device:GPU:0": 9.0, "/device:GPU:1": 4.0}  # ns; the trace counts ps
    assert collectives.communication_ns(_xspace(host)) == {}
    odd = _plane("/device:GPU:0", {"Launch Stats": [(1, 10, None)]}, names)
    with pytest.raises(ValueError, match="neither an 'XLA Ops' line nor 'Stream' lines"):
        collectives.communication_ns(_xspace(odd))


def test_one_process_per_device_launcher_on_cpu(tmp_path, capsys):
    """The launcher spawns one jax.distributed process (one CPU device) and returns its rows
    with a real trace read; CPU traces have no device ops, so no communication time."""
    out = tmp_path / "rows.json"
    bench_scaling.main(
        ["--presets", "tiny", "--devices", "1", "--layouts", "data", "--shape", "1x32",
         "--steps", "1", "--warmup", "1", "--profile-steps", "1", "--processes", "device",
         "--dtype", "float32", "--json", str(out)]
    )  # fmt: skip
    (row,) = json.loads(out.read_text())
    assert row["layout"] == "single" and row["processes"] == 1 and row["status"] == "ok"
    assert row["tokens_per_s_per_device"] > 0 and row["peak_gib"] > 0
    assert row["comm_ms"] is None and row["efficiency"] == 1.0
    assert "comm time" in capsys.readouterr().out


def test_too_many_devices_is_refused():
    with pytest.raises(SystemExit):
        bench_scaling.parse_args(["--devices", "1", str(jax.device_count() + 1)])


# ---------------------------------------------------------------- child process (8 devices)


def one_step(layout: str | None, num_devices: int, *extra: str) -> dict:
    """STEPS train steps of the tiny model on `layout` over `num_devices` devices (None: one
    device): losses, gradients, parameters before and after, and what the layout splits."""
    from gdn2_jax import data, sharding, trainer

    cfg = tiny_config("/unused", *GRADIENTS_IN_ADAM, *MODEL, *extra)
    num = 1 if layout is None else num_devices
    cfg = dataclasses.replace(cfg, mesh=bench_scaling.layout_mesh(layout or "data", num))
    mesh = sharding.make_mesh(cfg.mesh, devices=jax.devices()[:num])
    batches = data.eval_batches(cfg.data, STEPS)
    losses, grads = [], []
    with jax.set_mesh(mesh):
        run = trainer.build(cfg, mesh)
        state = run.init_fn(jax.random.key(0))
        init = jax.device_get(state.params)
        for batch in batches:
            state, metrics = run.step_fn(state, sharding.host_local_to_global(batch, mesh))
            losses.append(float(metrics["loss"]))
            grads.append(jax.device_get(adam_first_moment(state.opt_state)))
    specs = [x.sharding.spec for x in jax.tree.leaves(state.params)]
    return {
        "init": init,
        "loss": losses,
        "grads": grads,
        "params": jax.device_get(state.params),
        "param_axes": _split_axes(specs, mesh),
        "batch_axes": _split_axes([sharding.batch_spec(mesh)], mesh),
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
    }


def _split_axes(specs, mesh) -> list[str]:
    """The mesh axes of size > 1 that the PartitionSpecs split over."""
    names = {str(a) for spec in specs for dim in spec if dim for a in np.atleast_1d(dim)}
    return sorted(a for a in names if mesh.shape[a] > 1)


def compare(got: dict, want: dict) -> dict[str, float]:
    """Relative errors of a sharded step against the single-device one, and how far the
    single-device step moved the parameters."""
    from gdn2_jax.crosscheck import rel_err

    return {
        "loss": rel_err(got["loss"], want["loss"]),
        "grads": tree_error(got["grads"], want["grads"]),
        "params": tree_error(got["params"], want["params"]),
        "params_moved": _global_change(want["params"], want["init"]),
    }


def _global_change(new, old) -> float:
    """‖new − old‖ / ‖old‖ over all leaves together (some leaves start at zero)."""
    pairs = list(zip(jax.tree.leaves(new), jax.tree.leaves(old), strict=True))
    diff = sum(float(np.sum((np.float64(a) - b) ** 2)) for a, b in pairs)
    return (diff / sum(float(np.sum(np.float64(b) ** 2)) for _, b in pairs)) ** 0.5


def step_errors(layout: str, num_devices: int, *extra: str) -> dict[str, float]:
    """`compare` of the steps on `layout` over `num_devices` devices with one device."""
    return compare(one_step(layout, num_devices, *extra), one_step(None, 1, *extra))


def _layouts():
    want = one_step(None, 1)
    out = {}
    for layout in bench_scaling.LAYOUTS:
        got = one_step(layout, 8)
        keep = ("param_axes", "batch_axes", "mesh")
        out[layout] = {"errors": compare(got, want), "devices": 8, **{k: got[k] for k in keep}}
    return out


if __name__ == "__main__" and sys.argv[1] == "layouts":
    print(json.dumps(_layouts()))
