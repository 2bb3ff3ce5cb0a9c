import os
import shutil
import tempfile

import pytest

# The persistent XLA compilation cache of this test session (train_testing.py reads it): made once
# here, before pytest-xdist starts its workers, so that they and their child processes share it.
CACHE_VARIABLE = "GDN2_JAX_TEST_XLA_CACHE"


def pytest_configure(config):
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
