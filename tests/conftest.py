import pytest


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
