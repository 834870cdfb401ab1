"""Intensity and channel preprocessing shared by inference and training.

Every function takes a numpy array and returns a new float32 array; none of them changes its input.
Functions that alter the data in a way the user should know about also return human-readable notes.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from monai.transforms import NormalizeIntensity, ScaleIntensityRange

# Luminance weights (ITU-R BT.709, the ones skimage.color.rgb2gray uses). Applied by hand because rgb2gray
# rescales integer images to [0, 1], which would change the intensity scale the model's normalisation expects.
LUMINANCE = np.array([0.2125, 0.7154, 0.0721], dtype=np.float32)


class TransformError(ValueError):
    """An image or a normalisation setting cannot be used; the message says why and what to do."""


def sanitize(image: np.ndarray) -> tuple[np.ndarray, int]:
    """Replace NaN and -Inf by the finite minimum and +Inf by the finite maximum (0 if nothing is finite).

    Returns the float32 image and how many values were replaced.
    """
    image = np.asarray(image)
    if image.dtype.kind not in "biuf":
        raise TransformError(f"image has dtype {image.dtype}; expected a numeric (integer or float) array")
    out = image.astype(np.float32, copy=True)
    bad = ~np.isfinite(out)
    n_bad = int(bad.sum())
    if n_bad:
        finite = out[~bad]
        low = float(finite.min()) if finite.size else 0.0
        high = float(finite.max()) if finite.size else 0.0
        np.nan_to_num(out, copy=False, nan=low, posinf=high, neginf=low)
    return out, n_bad


def normalize(
    image: np.ndarray, normalization: Mapping[str, Any], stats: Mapping[str, float] | None = None
) -> np.ndarray:
    """Intensity normalisation per ``spec.normalization``; statistics are taken over the whole array.

    ``zscore``: (x - mean) / std, NaN ignored, std 0 treated as 1; ``minmax``: to [0, 1];
    ``window``: clip to [low, high] then to [0, 1]; ``scale``: divide by ``factor``.
    ``stats`` (``mean``, ``std``, ``low``, ``high``) replaces the statistics of ``image``, so that a part of a
    large volume is normalised as the whole would be (streamed 3D inference).
    """
    image = np.asarray(image, dtype=np.float32)
    kind = normalization.get("kind")
    if kind == "zscore":
        if stats is not None:
            mean, std = float(stats["mean"]), float(stats["std"])
        else:
            finite = image[np.isfinite(image)]
            mean = float(finite.mean()) if finite.size else 0.0
            std = float(finite.std()) if finite.size else 0.0
        # explicit statistics: NormalizeIntensity's own would turn into NaN as soon as one voxel is NaN
        out = NormalizeIntensity(subtrahend=mean, divisor=std if std > 0 else 1.0)(image)
    elif kind == "minmax":
        if stats is not None:
            low, high = float(stats["low"]), float(stats["high"])
        else:
            finite = image[np.isfinite(image)]
            low = float(finite.min()) if finite.size else 0.0
            high = float(finite.max()) if finite.size else 0.0
        if high <= low:  # constant image: map to 0 rather than dividing by zero
            return np.where(np.isfinite(image), 0.0, image).astype(np.float32)
        out = ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0)(image)
    elif kind == "window":
        low, high = float(normalization["low"]), float(normalization["high"])
        if high <= low:
            raise TransformError(f"normalization window low={low} must be below high={high}")
        out = ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)(image)
    elif kind == "scale":
        factor = float(normalization.get("factor", 1.0))
        if factor == 0:
            raise TransformError("normalization kind 'scale' needs a non-zero 'factor'")
        out = ScaleIntensityRange(a_min=0.0, a_max=factor, b_min=0.0, b_max=1.0)(image)
    else:
        raise TransformError(
            f"normalization kind {kind!r} is not known; expected one of 'zscore', 'minmax', 'window', 'scale'"
        )
    return np.asarray(out, dtype=np.float32)


def to_channels(image: np.ndarray, in_channels: int, rgb: bool = False) -> tuple[np.ndarray, list[str]]:
    """Bring an image to channel-first ``[in_channels, *spatial]``.

    ``rgb=True`` means the last axis holds colour (3 = RGB, 4 = RGBA; alpha is dropped). Grey images are
    repeated to ``in_channels``; colour images given to a 1-channel model become luminance. Returns the float32
    array and the list of conversions made (empty when the image already fitted).
    """
    image = np.asarray(image)
    notes: list[str] = []
    if rgb:
        n = image.shape[-1]
        if n not in (3, 4):
            raise TransformError(f"a colour image needs 3 (RGB) or 4 (RGBA) values on its last axis, got {n}")
        if n == 4:
            image = image[..., :3]
            notes.append("RGBA -> RGB (alpha channel dropped)")
        colour = np.moveaxis(image.astype(np.float32), -1, 0)
        if in_channels == 3:
            return np.ascontiguousarray(colour), notes
        if in_channels == 1:
            grey = np.tensordot(LUMINANCE, colour, axes=1)[None]
            notes.append("RGB -> grey (luminance 0.2125 R + 0.7154 G + 0.0721 B) for a 1-channel model")
            return grey.astype(np.float32), notes
        raise TransformError(
            f"the model expects {in_channels} channels; a colour image (3 channels) cannot be converted to that"
        )
    grey = image.astype(np.float32)[None]
    if in_channels == 1:
        return grey, notes
    notes.append(f"grey -> {in_channels} channels (the grey image repeated) for a {in_channels}-channel model")
    return np.repeat(grey, in_channels, axis=0), notes
