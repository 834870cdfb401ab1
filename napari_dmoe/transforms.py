"""Intensity, channel and geometry preprocessing shared by inference and training.

Every function returns a new array; none of them changes its input. Functions that alter the data in a way the
user should know about also return human-readable notes. Resampling is here once (``resampled_shape``,
``resize``, ``resize_labels``) so training sees the grid and interpolation inference uses.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

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
        out = _float32(image) - mean
        out /= std if std > 0 else 1.0  # MONAI NormalizeIntensity's arithmetic (importing MONAI costs seconds)
    elif kind == "minmax":
        if stats is not None:
            low, high = float(stats["low"]), float(stats["high"])
        else:
            finite = image[np.isfinite(image)]
            low = float(finite.min()) if finite.size else 0.0
            high = float(finite.max()) if finite.size else 0.0
        if high <= low:  # constant image: map to 0 rather than dividing by zero
            return np.where(np.isfinite(image), 0.0, image).astype(np.float32)
        out = _scale_range(image, low, high)
    elif kind == "window":
        low, high = float(normalization["low"]), float(normalization["high"])
        if high <= low:
            raise TransformError(f"normalization window low={low} must be below high={high}")
        out = np.clip(_scale_range(image, low, high), 0.0, 1.0)
    elif kind == "scale":
        factor = float(normalization.get("factor", 1.0))
        if factor == 0:
            raise TransformError("normalization kind 'scale' needs a non-zero 'factor'")
        out = _scale_range(image, 0.0, factor)
    else:
        raise TransformError(
            f"normalization kind {kind!r} is not known; expected one of 'zscore', 'minmax', 'window', 'scale'"
        )
    return np.asarray(out, dtype=np.float32)


def _float32(image: Any) -> np.ndarray:
    return np.array(image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else image, dtype=np.float32)


def _scale_range(image: Any, low: float, high: float) -> np.ndarray:
    """[low, high] -> [0, 1], MONAI ScaleIntensityRange's arithmetic in float32 (without importing MONAI: the
    first mask waits for every import)."""
    out = _float32(image) - low
    out /= high - low
    return out


STANDARD_BITS = (8, 10, 12, 14, 16)  # the bit depths scanners and cameras store (12-bit CT, X-ray, microscopy)


def for_bit_depth(normalization: Mapping[str, Any], dtype: Any, image: Any = None) -> tuple[dict[str, Any], list[str]]:
    """The normalisation to apply to an image of ``dtype``, and a note when it differs from the model's.

    ``scale`` divides by the full-scale value of the images the model was trained on (255: 8-bit). An image
    stored with another bit depth is divided by its own full scale instead, so its intensities land where the model
    expects them. With the pixels (``image``) the full scale is the one the values use: a 16-bit file holding 12-bit
    data (values up to 4095) is divided by 4095, an int16 image without negative values by the standard depth its
    values fit, a floating-point image in [0, 1] by 1. A signed image with negative values has no full scale: it is
    refused (``TransformError``) rather than divided into nonsense. Other kinds do not depend on the bit depth
    (z-score, min-max) or state absolute values (window). Notes say what was done, never more."""
    normalization = dict(normalization)
    dtype = np.dtype(dtype)
    if normalization.get("kind") != "scale" or dtype.kind not in "buif":
        return normalization, []
    factor = float(normalization.get("factor", 1.0))
    if dtype.kind == "f":
        low, high = _finite_range(image)
        if image is None or factor <= 1 or low is None or low < 0 or high > 1:
            return normalization, []
        top, what = 1, "floating-point image with values in [0, 1] (its full scale is 1)"
    elif dtype.kind == "b":
        top, what = 1, "1-bit image"
    else:
        bits = 8 * dtype.itemsize
        usable = bits - 1 if dtype.kind == "i" else bits
        top, what = 2**usable - 1, f"{'signed ' if dtype.kind == 'i' else ''}{bits}-bit image"
        low, high = _finite_range(image)
        if low is not None and low < 0:
            raise TransformError(
                f"{what} with negative values (down to {low:g}): this model divides intensities by {factor:g} "
                "(unsigned images from 0) and has no rule for negative ones; convert the image to unsigned 8 or 16 "
                "bits")
        if high is not None and (dtype.kind == "i" or bits > 8):
            used = next(b for b in (*[b for b in STANDARD_BITS if b < usable], usable) if high < 2**b)
            if used < usable:
                top, what = 2**used - 1, f"{what} whose values reach only {high:g} ({used}-bit data)"
    if top == factor:
        return normalization, []
    normalization["factor"] = float(top)
    return normalization, [f"{what}: intensities divided by {top} instead of the model's {factor:g}"]


def _finite_range(image: Any) -> tuple[float | None, float | None]:
    """(min, max) of the finite values of ``image``; (None, None) without an image or finite values."""
    if image is None:
        return None, None
    values = np.asarray(image)
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        values = values[np.isfinite(values)]
    if values.size == 0:
        return None, None
    return float(values.min()), float(values.max())


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


# -- geometry ------------------------------------------------------------------------------------------------
def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> tuple[int, ...]:
    """Grid size at the ``target`` voxel size: ``round(n * s / t)``, at least 1 per axis (training and inference
    both resample to this grid). The grid is checked against ``limits.max_voxels()`` before anyone allocates it:
    an absurd voxel size would otherwise ask for tens of gigabytes."""
    from napari_dmoe.limits import check_grid, resampled_grid

    values = [float(v) for v in (*spacing, *target)]
    if not all(np.isfinite(v) and v > 0 for v in values):
        raise TransformError(f"cannot resample from voxel size {tuple(spacing)} to {tuple(target)} mm: every voxel "
                             "size must be a positive number")
    grid = resampled_grid(shape, spacing, target)
    check_grid(grid, f"resampling {tuple(int(n) for n in shape)} voxels of {tuple(float(s) for s in spacing)} mm to "
               f"{tuple(float(t) for t in target)} mm", TransformError)
    return grid


def resize(x: torch.Tensor, size: Sequence[int], antialias: bool = False) -> torch.Tensor:
    """Linear resize of ``[N, C, *spatial]`` to ``size`` (bilinear in 2D, trilinear in 3D); no-op if equal."""
    size = tuple(int(s) for s in size)
    if tuple(x.shape[2:]) == size:
        return x
    mode = "bilinear" if len(size) == 2 else "trilinear"
    # torch supports antialiasing only for 2D bilinear; it matters when shrinking photos
    antialias = antialias and len(size) == 2 and any(s < t for s, t in zip(size, x.shape[2:]))
    return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=antialias)


def resize_image(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """``[C, *spatial]`` float image -> ``size``, linearly (antialiased when shrinking a 2D image), exactly as
    the inference engine brings an image to its work grid."""
    if tuple(image.shape[1:]) == tuple(int(s) for s in size):
        return image
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    return resize(x, size, antialias=True)[0].numpy()


def resize_labels(labels: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Integer label map ``[*spatial]`` -> ``size``: the label whose voxel centre is nearest, on the same
    ``align_corners=False`` grid as ``resize_image``."""
    if tuple(labels.shape) == tuple(int(s) for s in size):
        return labels
    lab = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.float32))[None, None]
    return F.interpolate(lab, size=tuple(int(s) for s in size), mode="nearest-exact")[0, 0].numpy().astype(np.int64)


# -- intensity statistics: written into a model's trained_on record by training, compared by the fit check -------
MAX_VALUES = 200_000  # voxels per image that enter the intensity statistics


def _strided(image: Any) -> np.ndarray:
    """At most ~MAX_VALUES finite values of the image on a regular stride (a dask or memory-mapped volume is
    read sparsely, never whole)."""
    shape = np.shape(image)
    step = max(1, int(np.ceil((int(np.prod(shape)) / MAX_VALUES) ** (1 / max(len(shape), 1)))))
    values = np.asarray(image[tuple(slice(None, None, step) for _ in shape)], dtype=np.float32).ravel()
    return values[np.isfinite(values)]


def intensity_stats(images: Sequence[Any]) -> dict[str, Any]:
    """Pooled mean, std, p1, p50, p99 over ``images`` (all channels) and the range of the per-image median and
    99th percentile (``case_p50``, ``case_p99``: [min, max]); {} when there are no finite values."""
    pooled, p50, p99 = [], [], []
    for image in images:
        values = _strided(image)
        if values.size == 0:
            continue
        pooled.append(values)
        mid, hi = np.percentile(values, [50, 99])
        p50.append(float(mid))
        p99.append(float(hi))
    if not pooled:
        return {}
    allv = np.concatenate(pooled)
    p1, p50_all, p99_all = (float(v) for v in np.percentile(allv, [1, 50, 99]))
    return {"mean": float(allv.mean()), "std": float(allv.std()), "p1": p1, "p50": p50_all, "p99": p99_all,
            "case_p50": [min(p50), max(p50)], "case_p99": [min(p99), max(p99)], "n_cases": len(p50)}
