import os
import shutil
import tempfile

import pytest

# The persistent XLA compilation cache of this test session (train_testing.py reads it): made once
# here, before pytest-xdist starts its workers, so that they and their child processes share it.
CACHE_VARIABLE = "GDN2_JAX_TEST_XLA_CACHE"


# XLA:CPU spends most of this suite's time compiling many small programs, and most of that in
# LLVM's optimization passes. The tests check what the programs compute, not how fast they run:
# at backend optimization level 0 the suite needs about a third less CPU time (measured on 2
# cores: tests/test_generate.py 120 -> 69 s on one core, test_context.py's child 119 -> 76 s),
# with the same HLO (XLA's own passes all run) and errors of the same size. Set here, before JAX
# starts its backend; xdist workers, child processes (train_testing.python_env keeps the flag)
# and notebook kernels inherit it. A level already in XLA_FLAGS wins.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"


def _add_test_xla_flags():
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {TEST_XLA_FLAGS}".strip()


def pytest_configure(config):
    _add_test_xla_flags()
    if hasattr(config, "workerinput") or os.environ.get(CACHE_VARIABLE):
        return  # an xdist worker (its controller made the cache), or a session inside another
    path = tempfile.mkdtemp(prefix="gdn2-jax-test-xla-cache-")
    os.environ[CACHE_VARIABLE] = path

    def remove():
        del os.environ[CACHE_VARIABLE]
        shutil.rmtree(path, ignore_errors=True)

    config.add_cleanup(remove)


@pytest.fixture
def fla_on_cpu(monkeypatch):
    """fla's GatedDeltaNet2 class, patched to run on CPU with PyTorch references."""
    from testing import patch_fla_for_cpu

    return patch_fla_for_cpu(monkeypatch)


def pytest_collection_modifyitems(config, items):
    del config
    for item in items:
        if "gpu" in item.keywords:
            # pallas_call's Triton lowering is deprecated since JAX 0.11 but is what 0.11.2 runs.
            item.add_marker(pytest.mark.filterwarnings("ignore::DeprecationWarning"))
