"""The model input of a 3D volume, made window by window (streamed 3D inference).

A float32 copy of a 300x512x512 scan is 300 MiB, and sanitising, channel conversion, normalisation and
resampling each made one more, all scaling with the volume. Here the intensity statistics are computed once,
chunk by chunk over the raw image; each window's input is then made straight from the raw image with the same
float32 steps as ``inference_prep.prepare_image`` (sanitise, channels, normalise with the whole-volume
statistics) on just the box it needs, resampled to the work grid with the linear mapping of ``F.interpolate``
and zero-padded past the work grid, as the whole-volume path pads.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from napari_dmoe.inference.plan import InferenceError, Plan
from napari_dmoe.model.spec import ModelSpec
from napari_dmoe.inference.routing import linear_indices
from napari_dmoe.transforms import for_bit_depth, TransformError, normalize, to_channels

CHUNK_VOXELS = 2**21  # raw voxels per chunk of the statistics passes (8 MiB as float32)


class VolumeInput:
    """Windows ``[C, *roi]`` float32 of the preprocessed volume on the padded work grid of ``plan``.

    ``notes`` and ``warnings`` say what was done to the input, as ``prepare_image``'s do.
    """

    def __init__(self, spec: ModelSpec, image: np.ndarray, rgb: bool, plan: Plan) -> None:
        self.image, self.rgb, self.plan = image, rgb, plan
        self.in_channels = spec.in_channels
        self.notes: list[str] = []
        self.warnings: list[str] = []
        try:
            # the bit-depth rule sees the range of the whole volume, as prepare_image's (and the fit check's) does
            self.normalization, depth_notes = for_bit_depth(spec.normalization, image.dtype, self._range(image))
            _, self.notes = to_channels(image[:1, :1, :1], self.in_channels, rgb=rgb)  # the notes only
            self.notes += depth_notes
        except TransformError as err:
            raise InferenceError(str(err)) from None
        self.fill: tuple[float, float] | None = None  # values for NaN/-Inf and +Inf, when the image has any
        self.stats: dict[str, float] = {}
        self._statistics()
        # per axis: None where the work grid is the image grid, else the linear-resize indices and weights
        self.axes = [None if w == n else linear_indices(n, w) for n, w in zip(plan.image, plan.work)]

    @staticmethod
    def _range(image: np.ndarray) -> np.ndarray:
        """The volume's finite minimum and maximum as a two-value array of its dtype (empty when it has none),
        read a few planes at a time: no float copy of the volume is made."""
        per_plane = max(1, int(np.prod(image.shape[1:])))
        low = high = None
        for z in range(0, image.shape[0], max(1, CHUNK_VOXELS // per_plane)):
            chunk = np.asarray(image[z : z + max(1, CHUNK_VOXELS // per_plane)])
            if chunk.dtype.kind == "f":
                chunk = chunk[np.isfinite(chunk)]
            if chunk.size:
                low = chunk.min() if low is None else min(low, chunk.min())
                high = chunk.max() if high is None else max(high, chunk.max())
        return np.array([] if low is None else [low, high], dtype=image.dtype)

    def _chunks(self) -> Iterator[np.ndarray]:
        """The raw image as float32, a few z planes at a time (NaN/Inf replaced once ``fill`` is known)."""
        per_plane = max(1, int(np.prod(self.image.shape[1:])))
        step = max(1, CHUNK_VOXELS // per_plane)
        for z in range(0, self.image.shape[0], step):
            yield self._sanitized(self.image[z : z + step])

    def _sanitized(self, raw: np.ndarray) -> np.ndarray:
        data = raw.astype(np.float32)
        if self.fill is not None:
            low, high = self.fill
            np.nan_to_num(data, copy=False, nan=low, posinf=high, neginf=low)
        return data

    def _channels(self, data: np.ndarray) -> np.ndarray:
        return to_channels(data, self.in_channels, rgb=self.rgb)[0]

    def _statistics(self) -> None:
        """Up to three passes over the raw image: finite range and NaN/Inf count, then what the normalisation
        needs (z-score: mean, then the spread around it; float64 sums, so the order of the chunks does not
        matter; min-max: the range of the channel values)."""
        low, high, n_bad = np.inf, -np.inf, 0
        for data in self._chunks():
            finite = np.isfinite(data)
            if not finite.all():
                n_bad += int(finite.size - np.count_nonzero(finite))
                data = data[finite]
            if data.size:
                low, high = min(low, float(data.min())), max(high, float(data.max()))
        if low > high:  # nothing finite
            low = high = 0.0
        if n_bad:
            self.fill = (low, high)
            self.notes.insert(0, f"replaced {n_bad} NaN/Inf value(s) by the finite minimum/maximum")
        if self.image.size and low == high:
            self.warnings.append(f"the image is constant (all {low:g}); the segmentation carries no information")
        kind = self.normalization.get("kind")
        if kind == "zscore":
            total, count = 0.0, 0
            for data in self._chunks():
                chans = self._channels(data)
                total, count = total + float(chans.sum(dtype=np.float64)), count + chans.size
            mean = total / max(count, 1)
            spread = 0.0
            for data in self._chunks():
                dev = self._channels(data).astype(np.float64).ravel() - mean
                spread += float(np.dot(dev, dev))
            self.stats = {"mean": mean, "std": float(np.sqrt(spread / max(count, 1)))}
        elif kind == "minmax":
            low, high = np.inf, -np.inf
            for data in self._chunks():
                chans = self._channels(data)
                low, high = min(low, float(chans.min())), max(high, float(chans.max()))
            self.stats = {"low": low, "high": high}
        try:  # a bad setting (e.g. window low >= high) shows now, before any window is run
            normalize(np.zeros((1, 1), np.float32), self.normalization, self.stats)
        except TransformError as err:
            raise InferenceError(str(err)) from None

    def window(self, start: tuple[int, ...], roi: tuple[int, ...]) -> torch.Tensor:
        """The input ``[C, *roi]`` of the window at ``start`` on the padded work grid (zeros past the work grid)."""
        out = torch.zeros((self.in_channels, *roi), dtype=torch.float32)
        box = [(s, min(s + r, w)) for s, r, w in zip(start, roi, self.plan.work)]
        if any(a >= b for a, b in box):
            return out
        src = []
        for (a, b), axis in zip(box, self.axes):
            src.append(slice(a, b) if axis is None else slice(int(axis[0][a]), int(axis[1][b - 1]) + 1))
        data = self._sanitized(self.image[tuple(src)])
        x = torch.from_numpy(normalize(self._channels(data), self.normalization, self.stats))
        for d, ((a, b), axis, s) in enumerate(zip(box, self.axes, src)):
            if axis is not None:  # linear resampling along this axis (trilinear = one axis after the other)
                i0 = torch.from_numpy(axis[0][a:b] - s.start)
                i1 = torch.from_numpy(axis[1][a:b] - s.start)
                lam = torch.from_numpy(axis[2][a:b]).reshape([-1 if i == d else 1 for i in range(3)])
                x = x.index_select(d + 1, i0) * (1 - lam) + x.index_select(d + 1, i1) * lam
        out[(slice(None), *(slice(0, b - a) for a, b in box))] = x
        return out
