"""The one image type of io/ (``Volume``) and its errors: the base every format module builds on, so that
``images.py`` can dispatch to the format modules without an import circle."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


class ImageReadError(ValueError):
    """A file or folder cannot be read as an image; the message names it and says what to do."""


class ImageWriteError(ValueError):
    """Labels cannot be written as asked; the message names the problem."""


@dataclass
class Volume:
    """An image in napari axis order with its physical geometry.

    spacing: mm per voxel along each spatial axis (unit spacing with ``meta["spacing_known"] = False`` for
    plain 2D images). origin: position of the first voxel along each axis, in mm. affine: 4x4 from the
    (z, y, x) array index to RAS+ world mm for 3D volumes, else None. meta: ``source``, ``format``,
    ``modality``, ``orientation``, ``warnings`` (list of str) and format-specific geometry.
    """

    array: np.ndarray
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    affine: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def rgb(self) -> bool:
        return bool(self.meta.get("rgb", False))

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape[: len(self.spacing)])

    @property
    def known_spacing(self) -> tuple[float, ...] | None:
        """``spacing`` where the file states a voxel size (NIfTI, DICOM), None where it does not (PNG, TIFF):
        the one reading of ``meta["spacing_known"]`` (see ``layer_spacing`` for a Volume made without it)."""
        return layer_spacing(self.spacing, self.meta)


def layer_spacing(scale: Any, metadata: Any) -> tuple[float, ...] | None:
    """The voxel size (mm) a napari layer's ``scale`` stands for, or None when it is not known to be one.

    Our reader records ``spacing_known`` in the layer metadata. A layer from elsewhere (a TIFF stack, an array)
    with unit scale has no known voxel size: resampling it to a model's spacing would be a guess."""
    if scale is None:
        return None
    scale = tuple(float(s) for s in scale)
    known = (metadata or {}).get("spacing_known")
    if known is None:
        known = any(s != 1.0 for s in scale)
    return scale if known else None
