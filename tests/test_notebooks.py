"""Executes every research notebook top to bottom, as CI does, with a short budget.

Each notebook has one cell tagged "parameters"; the CI values below are injected in a cell right
after it (papermill's convention), so the notebook's own defaults stay the ones a reader runs.
The kernel is this interpreter (the venv's python), registered in a temporary kernelspec
directory so that no user- or system-wide "python3" kernel can be picked up instead.
Notebooks are stored without outputs; a test holds them to that.
"""

import json
import os
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
KERNEL_NAME = "gdn2-jax-test"

# name -> (parameters injected for CI, wall-time limit in seconds on a 2-core CPU). The limits are
# about three times the measured time, so a slow machine passes and a runaway notebook does not.
CASES = {
    "01_gated_delta_rule_2.ipynb": ({}, 180),
    "02_numerics_vs_pytorch.ipynb": ({}, 240),
    # CI runs the tiny preset of the gate ablation here (6 variants x 2 seeds), whatever JSON
    # the repository holds.
    "03_memory_editing.ipynb": ({"RUN_PRESET": "tiny"}, 420),
    # On a GPU this notebook runs the benchmark itself: one short shape there.
    "04_kernels_and_speed.ipynb": ({"SHAPES": ("1x4096",), "ITERS": 5}, 180),
}


def _notebook_paths():
    return sorted(NOTEBOOKS.glob("*.ipynb"))


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory, request):
    """A kernelspec for this interpreter, found first through JUPYTER_PATH."""
    root = tmp_path_factory.mktemp("jupyter")
    spec_dir = root / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "gdn2-jax (test venv)",
        "language": "python",
        "env": {"MPLBACKEND": "Agg", "PYTHONWARNINGS": "ignore::DeprecationWarning"},
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    patch = pytest.MonkeyPatch()
    patch.setenv("JUPYTER_PATH", os.pathsep.join([str(root), os.environ.get("JUPYTER_PATH", "")]))
    patch.setenv("MPLBACKEND", "Agg")
    # Connection files and IPython's profile go to the temporary folder, not the home directory.
    patch.setenv("JUPYTER_RUNTIME_DIR", str(root / "runtime"))
    patch.setenv("IPYTHONDIR", str(root / "ipython"))
    request.addfinalizer(patch.undo)
    return KERNEL_NAME


def inject_parameters(nb, params):
    """Inserts `NAME = value` lines after the cell tagged "parameters"."""
    index = next(
        (i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])), None
    )
    if index is None:
        raise AssertionError("the notebook has no cell tagged 'parameters'")
    if params:
        source = "\n".join(f"{name} = {value!r}" for name, value in params.items())
        cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
        nb.cells.insert(index + 1, cell)
    return nb


def test_every_notebook_is_listed():
    assert sorted(p.name for p in _notebook_paths()) == sorted(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_stored_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{name} has outputs"


def execute(name, params, limit_s, kernel_name, tmp_path):
    """Runs the notebook in its folder on the given kernel; returns it executed and the seconds."""
    nb = inject_parameters(nbformat.read(NOTEBOOKS / name, as_version=4), params)
    client = nbclient.NotebookClient(
        nb,
        kernel_name=kernel_name,
        timeout=limit_s,
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    start = time.perf_counter()
    try:
        client.execute()
    finally:
        # The executed copy, for reading what went wrong.
        nbformat.write(nb, tmp_path / name)
    return nb, time.perf_counter() - start


def stdout_of(nb):
    return "".join(
        out.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
        if out.output_type == "stream"
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_notebook_executes(name, kernel_env, tmp_path):
    params, limit_s = CASES[name]
    _, elapsed = execute(name, params, limit_s, kernel_env, tmp_path)
    print(f"{name}: {elapsed:.1f} s")
    assert elapsed < limit_s, f"{name} took {elapsed:.0f} s, over its {limit_s} s budget"


SAMPLE_RESULTS = """# Results

## 2026-01-01, NVIDIA H100 80GB HBM3 (a made-up sample)

| shape | impl | fwd ms | fwd+bwd ms | fwd x | f+b x | peak GiB | err vs fla |
|---|---|---:|---:|---:|---:|---:|---:|
| 4x4096 H16 K128 V128 bfloat16 | fla chunk_gdn2 | 1.21 | 6.43 | 1.00 | 1.00 | 2.10 | nan |
| 4x4096 H16 K128 V128 bfloat16 | xla | 4.83 | 13.84 | 3.99 | 2.15 | 6.00 | 2.1e-03 |

| a table | without timings |
|---|---|
| x | y |
"""


@pytest.mark.slow
def test_speed_notebook_reads_recorded_results(kernel_env, tmp_path):
    """Whatever benchmarks/RESULTS.md holds when CI runs, the parser is exercised on a sample."""
    results = tmp_path / "RESULTS.md"
    results.write_text(SAMPLE_RESULTS)
    params = {"RESULTS_FILE": str(results), "CPU_DEMO": False}
    nb, _ = execute("04_kernels_and_speed.ipynb", params, 120, kernel_env, tmp_path)
    assert "RESULTS.md: 2 table(s), 1 drawn." in stdout_of(nb)
