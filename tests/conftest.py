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
