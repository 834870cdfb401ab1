"""Size limits checked before memory is allocated, so a bad header or an absurd voxel size fails fast.

``DMOE_MAX_VOXELS`` (environment variable) raises or lowers the largest grid napari-dmoe will allocate: an image
as stored, or the grid it is resampled to (default 2**30 voxels, 4 GiB per float32 channel; ``inf``: no limit).
"""
from __future__ import annotations

import math
import os
from typing import Sequence

# a site zoom (inference.scale): a camera further from the training scale needs a model trained at its scale
ZOOM_RANGE = (0.75, 1.33)
MAX_VOXELS_ENV = "DMOE_MAX_VOXELS"
DEFAULT_MAX_VOXELS = 2**30


def max_voxels() -> int | float:
    """The voxel limit: ``DMOE_MAX_VOXELS`` when set to a positive number (``inf``: no limit), else the default."""
    text = os.environ.get(MAX_VOXELS_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_VOXELS
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if math.isnan(number):
        raise ValueError(f"environment variable {MAX_VOXELS_ENV}={text!r} is not a number of voxels; give a "
                         "positive number, e.g. 4e9, or inf for no limit")
    if math.isinf(number) and number > 0:  # the user lifts the limit: memory is then the only bound
        return math.inf
    value = int(number) if math.isfinite(number) else 0
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


def resampled_grid(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> tuple[int, ...]:
    """The grid ``shape`` voxels of ``spacing`` mm take at ``target`` mm: ``round(n * s / t)``, at least 1 per axis.

    The one resampling rule (``transforms.resampled_shape`` uses it, and the server bounds the work of a request
    with it before the request runs). Python integers: an absurd voxel size gives a large number to refuse, never an
    overflow. Voxel sizes must be positive and finite (checked by the callers, which name the field)."""
    return tuple(max(1, round(int(n) * float(s) / float(t))) for n, s, t in zip(shape, spacing, target))
