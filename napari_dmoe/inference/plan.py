"""Checks and preparation before inference: attribute -> routers, image -> normalised stack, window plan."""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import numpy as np

from napari_dmoe.model.registry import input_rule
from napari_dmoe.model.spec import ModelSpec
from napari_dmoe.transforms import TransformError, for_bit_depth, normalize, resampled_shape, sanitize, to_channels

MIN_PIXELS = 8  # smaller images carry too little context for any of the networks
ALIGN = 4  # window offsets are multiples of this so routing maps can be kept at 1/4 resolution


class InferenceError(ValueError):
    """The input cannot be segmented as given; the message names the problem and what to do."""


class Progress(NamedTuple):
    """``done`` of ``total`` steps of ``stage`` ("preprocess", "infer", "postprocess")."""

    stage: str
    done: int
    total: int


@dataclass
class Plan:
    """Geometry of one run. ``image``: grid of one plane; ``work``: after resize/resample; ``padded``: scanned grid."""

    image: tuple[int, ...]
    work: tuple[int, ...]
    padded: tuple[int, ...]
    roi: tuple[int, ...]
    starts: list[tuple[int, ...]]
    align: int
    squeeze: bool  # True: one image; False: a stack of slices for a 2D model
    mode: str  # "resize" | "sliding" (2D) | "volume" (3D)


def check_image(
    spec: ModelSpec, image: Any, spacing: Sequence[float] | None, rgb: bool | None
) -> tuple[np.ndarray, tuple[int, ...], bool, tuple[float, ...] | None]:
    """Refuse images the model cannot take. Returns the array, its spatial shape, ``rgb`` and the spacing."""
    try:
        image = np.asarray(image)
    except Exception as err:  # ragged lists and the like
        raise InferenceError(f"image cannot be read as an array: {err}") from None
    if image.dtype.kind not in "biuf":
        raise InferenceError(f"image has dtype {image.dtype}; give a numeric (integer or float) array")
    if rgb is None:  # a colour axis is last and small; a spatial axis that small is refused below anyway
        rgb = image.ndim in (3, 4) and image.shape[-1] in (3, 4)
    spatial = image.shape[:-1] if rgb else image.shape
    if len(spatial) not in (2, 3):
        raise InferenceError(
            f"image has shape {image.shape}; expected (y, x), (y, x, 3|4) colour, (z, y, x) or (z, y, x, 3|4)"
        )
    if spec.spatial_dims == 3 and len(spatial) == 2:
        raise InferenceError(
            f"this is a 3D model ({spec.arch}) and the image is 2D {tuple(spatial)}; give a (z, y, x) volume "
            "or use a 2D model"
        )
    if min(spatial[-spec.spatial_dims :]) < MIN_PIXELS:  # a 2D model may get a stack of only a few slices
        raise InferenceError(
            f"image {tuple(spatial)} is too small: each axis the model sees needs at least {MIN_PIXELS} pixels"
        )
    if spacing is not None:
        spacing = tuple(float(s) for s in spacing)
        if len(spacing) != len(spatial) or min(spacing) <= 0:
            raise InferenceError(f"spacing {spacing} must give {len(spatial)} positive values, one per spatial axis")
    return image, tuple(spatial), bool(rgb), spacing


def prepare_image(
    spec: ModelSpec, image: Any, spacing: Sequence[float] | None, rgb: bool | None
) -> tuple[np.ndarray, tuple[float, ...] | None, bool, list[str], list[str]]:
    """Check and normalise an image into a ``[Z, C, *spatial]`` float32 stack.

    Returns the stack, the spacing of one plane (or None), whether it is a single image (``squeeze``),
    the conversions made and warnings.
    """
    image, spatial, rgb, spacing = check_image(spec, image, spacing, rgb)
    notes: list[str] = []
    warns: list[str] = []
    data, n_bad = sanitize(image)
    if n_bad:
        notes.append(f"replaced {n_bad} NaN/Inf value(s) by the finite minimum/maximum")
    if data.size and float(data.max()) == float(data.min()):
        warns.append(f"the image is constant (all {float(data.min()):g}); the segmentation carries no information")
    try:
        chans, more = to_channels(data, spec.in_channels, rgb=rgb)
    except TransformError as err:
        raise InferenceError(str(err)) from None
    notes += more
    squeeze = not (spec.spatial_dims == 2 and len(spatial) == 3)
    if squeeze:
        stack = chans[None]
    else:  # a 2D model on a volume: slices become the batch, normalised one by one as in training
        stack = np.ascontiguousarray(chans.transpose(1, 0, 2, 3))
        notes.append(f"2D model on a volume: segmented slice by slice ({stack.shape[0]} slices)")
        if spacing is not None:
            spacing = spacing[1:]
    try:
        normalization, more = for_bit_depth(spec.normalization, image.dtype, image)  # a 16-bit PNG is not 8-bit
        notes += more
        for z in range(stack.shape[0]):
            stack[z] = normalize(stack[z], normalization)
    except TransformError as err:
        raise InferenceError(str(err)) from None
    return stack, spacing, squeeze, notes, warns


def _ceil_to(value: int, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


def _starts(size: int, roi: int, overlap: float, align: int) -> list[int]:
    """Window starts along one axis. Like MONAI's scan (interval = roi * (1 - overlap), last window flush with
    the end) but with the interval rounded down to a multiple of ``align`` so routing maps can stay coarse."""
    if size <= roi:
        return [0]
    interval = max(align, int(roi * (1 - overlap)) // align * align)
    n = math.ceil((size - roi) / interval) + 1
    return sorted({min(i * interval, size - roi) for i in range(n)})


def make_plan(
    spec: ModelSpec,
    image: Sequence[int],
    spacing: Sequence[float] | None,
    roi_size: Sequence[int] | None,
    overlap: float,
    mode2d: str = "auto",
    squeeze: bool = True,
) -> Plan:
    """Where each window goes: see the geometry rules in ``inference.engine``'s module docstring. The window
    sizes follow the network's input rule (fixed size, or multiples of a divisor)."""
    image = tuple(int(s) for s in image)
    size = tuple(int(s) for s in spec.input_size)
    resampled = image if spacing is None or spec.spacing is None else resampled_shape(image, spacing, spec.spacing)
    mode = _mode(spec, resampled, mode2d)
    rule = input_rule(spec.arch, spec.arch_kwargs)
    roi = tuple(int(r) for r in (roi_size if roi_size is not None else size))
    problem = rule.problem(roi) if len(roi) == len(size) else f"must give {len(size)} sizes"
    if problem:
        fixed = " (fixed position embeddings)" if rule.fixed else ""
        raise InferenceError(f"roi_size {roi}: the windows of this {spec.arch} model {problem}{fixed}")
    if mode == "resize":
        if roi != size:
            raise InferenceError(f"roi_size {roi}: the whole image is resized to the input size {size} "
                                 "(mode2d='sliding' scans windows instead)")
        align = ALIGN if all(s % ALIGN == 0 for s in size) else 1
        return Plan(image, size, size, size, [(0,) * len(size)], align, squeeze, mode)
    align = ALIGN if all(r % ALIGN == 0 for r in roi) else 1
    if rule.fixed:  # windows of exactly the input size; the image is padded to at least one window
        padded = tuple(max(r, _ceil_to(n, align)) for n, r in zip(resampled, roi))
    else:  # padded to sizes the network takes; no need to scan more than the volume
        padded = tuple(rule.fit(_ceil_to(n, align)) for n in resampled)
        roi = tuple(min(r, p) for r, p in zip(roi, padded))
    return Plan(image, resampled, padded, roi, _grid(padded, roi, overlap, align), align, squeeze, mode)


def _mode(spec: ModelSpec, resampled: tuple[int, ...], mode2d: str) -> str:
    """2D: "resize" (the whole image to input_size, FairSeg style) or "sliding"; 3D: always "volume"."""
    if spec.spatial_dims != 2:
        return "volume"
    if mode2d not in ("auto", "resize", "sliding"):
        raise InferenceError(f"mode2d={mode2d!r}: expected 'auto', 'resize' or 'sliding'")
    if mode2d != "auto":
        return mode2d
    much_larger = any(r > 2 * s for r, s in zip(resampled, spec.input_size))
    return "sliding" if spec.spacing is not None and much_larger else "resize"


def _grid(padded: Sequence[int], roi: Sequence[int], overlap: float, align: int) -> list[tuple[int, ...]]:
    axes = [_starts(p, r, overlap, align) for p, r in zip(padded, roi)]
    return list(itertools.product(*axes))
