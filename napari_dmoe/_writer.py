"""npe2 writer: a labels layer -> NIfTI (.nii/.nii.gz, in the source image's geometry) or 2D PNG/TIFF.

Geometry comes from the layer metadata our reader stored (copy the image layer's metadata onto labels you
make from it); without it, from the layer's scale and translate.
"""
from __future__ import annotations

from typing import Any

import numpy as np


def write_labels_layer(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    from .data.io import Volume, write_labels

    labels = np.asarray(data)
    meta = dict(attributes.get("metadata") or {})
    ndim = labels.ndim
    if "nifti_affine" in meta or meta.get("affine") is not None:
        spacing = tuple(meta.get("spacing") or (1.0,) * ndim)
        origin = tuple(meta.get("origin") or (0.0,) * ndim)
        affine = np.asarray(meta["affine"]) if meta.get("affine") is not None else None
    else:
        spacing = tuple(float(s) for s in attributes.get("scale", (1.0,) * ndim))
        origin = tuple(float(t) for t in attributes.get("translate", (0.0,) * ndim))
        affine = None
    like = Volume(array=np.broadcast_to(np.zeros((), labels.dtype), labels.shape), spacing=spacing[-ndim:],
                  origin=origin[-ndim:], affine=affine, meta=meta)
    return [str(write_labels(path, labels, like=like))]
