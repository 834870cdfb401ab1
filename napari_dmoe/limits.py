"""Size limits checked before memory is allocated, so a bad header or an absurd voxel size fails fast.

``DMOE_MAX_VOXELS`` (environment variable) raises or lowers the largest grid napari-dmoe will allocate: an image
as stored, or the grid it is resampled to (default 2**30 voxels, 4 GiB per float32 channel).
"""
from __future__ import annotations

import math
import os
from typing import Sequence

MAX_VOXELS_ENV = "DMOE_MAX_VOXELS"
DEFAULT_MAX_VOXELS = 2**30


def max_voxels() -> int:
    """The voxel limit: ``DMOE_MAX_VOXELS`` when set to a positive integer, else the default."""
    text = os.environ.get(MAX_VOXELS_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_VOXELS
    try:
        value = int(float(text))
    except ValueError:
        raise ValueError(f"environment variable {MAX_VOXELS_ENV}={text!r} is not a number of voxels") from None
    if value < 1:
        raise ValueError(f"environment variable {MAX_VOXELS_ENV}={text!r} must be a positive number of voxels")
    return value


def check_grid(shape: Sequence[int], what: str, error: type[Exception] = ValueError) -> None:
    """Refuse a grid of more than ``max_voxels()`` voxels (or a non-positive size), naming ``what``."""
    if any(int(n) < 1 for n in shape):
        raise error(f"{what}: grid size {tuple(int(n) for n in shape)} has an axis of no voxels")
    n = math.prod(int(s) for s in shape)
    limit = max_voxels()
    if n > limit:
        raise error(f"{what}: a grid of {tuple(int(s) for s in shape)} = {n:.3g} voxels is above the limit of "
                    f"{limit:.3g} voxels (check the voxel sizes; to allow it, set the environment variable "
                    f"{MAX_VOXELS_ENV} to a larger number)")
