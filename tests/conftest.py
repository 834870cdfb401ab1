"""Shared test set-up: small thread pools (CI has 2 cores) and deterministic torch."""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest


@pytest.fixture(autouse=True)
def _torch_determinism():
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        yield
        return
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="module")
def model2d():
    """A tiny real TransUNet dMoE (3 race routers), freshly initialised with seed 0."""
    from inference_models import tiny

    return tiny("transunet2d-tiny")


@pytest.fixture(scope="module")
def model3d():
    """A tiny real 3D residual UNet dMoE (64^3 windows), freshly initialised with seed 0."""
    from inference_models import tiny

    return tiny("resunet3d-tiny")


# -- widget tests ---------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _user_config(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_DMOE_CONFIG_DIR", str(tmp_path / "config"))  # never touch the real user config


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """A tiny decisive TransUNet-dMoE file (4 experts, race) for the widget tests."""
    from inference_models import make_model

    return make_model(tmp_path_factory.mktemp("models") / "tiny.safetensors")


@pytest.fixture
def notifications():
    from napari.utils.notifications import notification_manager

    start = len(notification_manager.records)
    return lambda: [(str(n.severity), str(n.message)) for n in notification_manager.records[start:]]


@pytest.fixture(scope="module")
def registered_plugin():
    """Discover our manifest through its entry point, as napari does at start-up."""
    import npe2

    pm = npe2.PluginManager.instance()
    try:
        pm.get_manifest("napari-dmoe")
    except KeyError:
        pm.discover(include_npe1=False)
    pm.get_manifest("napari-dmoe")  # raises if the entry point is missing


def pytest_collection_modifyitems(config, items):
    """Every test that starts napari (uses make_napari_viewer, directly or through a fixture) is a gui test, so
    ``-m "not gui"`` runs napari-free; tests/test_house_rules.py keeps napari out of module-level imports."""
    for item in items:
        if "make_napari_viewer" in getattr(item, "fixturenames", ()) and item.get_closest_marker("gui") is None:
            item.add_marker(pytest.mark.gui)
