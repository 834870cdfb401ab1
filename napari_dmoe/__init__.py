"""napari-dmoe: Distribution-aware Mixture of Experts segmentation for napari and the command line.

The public API is loaded lazily so that napari's plugin menu opens without importing torch.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load_model": "napari_dmoe.io.checkpoint",
    "save_model": "napari_dmoe.io.checkpoint",
    "Model": "napari_dmoe.io.checkpoint",
    "ModelSpec": "napari_dmoe.model.spec",
    "segment": "napari_dmoe.inference.engine",
    "iter_segment": "napari_dmoe.inference.engine",
    "Segmentation": "napari_dmoe.inference.engine",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'napari_dmoe' has no attribute {name!r}")
