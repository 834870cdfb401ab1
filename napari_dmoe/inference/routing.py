"""Routing heatmaps: blend per-window gate weights into per-position maps over the whole image.

Memory choice: each dMoE position is accumulated at REDUCED resolution, ``a = gcd(align, stride)`` voxels per
cell along each axis (``stride`` = window size / token grid size of that position, ``align`` = 4 when the window
offsets are multiples of 4). Token grids are at most this fine anyway (stride >= 2), so little is lost, and the
accumulators are ``E / a**ndim`` times the image size per position, far below the float16 output itself. Window
weights are upsampled on the CPU to ``roi / a`` cells only (never to the full window), and the full-resolution
maps are made one expert at a time at the end, so peak memory tracks the output.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

from napari_dmoe.transforms import resize


def importance(roi: Sequence[int], blend: str) -> torch.Tensor:
    """MONAI's blending weights for one window (``gaussian`` or ``constant``), float32 on the CPU."""
    if blend == "constant":  # MONAI's constant map, without importing MONAI (seconds of a first mask)
        return torch.ones(tuple(int(r) for r in roi), dtype=torch.float32)
    from monai.data.utils import compute_importance_map

    return compute_importance_map(tuple(int(r) for r in roi), mode=blend, sigma_scale=0.125, device="cpu")


class RoutingAccumulator:
    """Weighted running mean of gate weights per position, for a stack of ``planes`` images of ``shape``.

    ``add`` takes the gate weights of one window ``[E, *grid]``; ``maps`` returns per-position
    ``[planes, E, *cells]`` means that sum to 1 over E wherever a window contributed.
    With ``depth`` (streamed 3D), only ``depth`` voxels of the first axis are held, from ``base`` on (``advance``
    moves it forward; both multiples of ``align`` so they fall on cell borders).
    """

    def __init__(
        self, planes: int, shape: Sequence[int], roi: Sequence[int], align: int, blend: str, depth: int | None = None
    ) -> None:
        self.planes, self.shape, self.roi = planes, tuple(shape), tuple(roi)
        self.align, self.blend = align, blend
        self.held = self.shape if depth is None else (depth, *self.shape[1:])
        self.base = 0
        self.sums: dict[str, torch.Tensor] = {}
        self.weights: dict[str, torch.Tensor] = {}
        self.factor: dict[str, tuple[int, ...]] = {}
        self._maps: dict[tuple[int, ...], torch.Tensor] = {}

    def _cell_factor(self, grid: Sequence[int]) -> tuple[int, ...]:
        out = []
        for r, g in zip(self.roi, grid):
            stride = r // g if r % g == 0 else 1
            out.append(math.gcd(self.align, stride))
        return tuple(out)

    def _window_weight(self, cells: tuple[int, ...]) -> torch.Tensor:
        if cells not in self._maps:  # the same blending as the probabilities, at cell resolution
            self._maps[cells] = importance(cells, self.blend)
        return self._maps[cells]

    def add(self, position: str, plane: int, start: Sequence[int], weights: torch.Tensor) -> None:
        """Blend one window's dense gate weights ``[E, *grid]`` whose window starts at voxel ``start``."""
        if position not in self.sums:
            factor = self._cell_factor(weights.shape[1:])
            cells = [math.ceil(s / f) for s, f in zip(self.held, factor)]
            self.factor[position] = factor
            self.sums[position] = torch.zeros((self.planes, weights.shape[0], *cells), dtype=torch.float32)
            self.weights[position] = torch.zeros((self.planes, 1, *cells), dtype=torch.float32)
        factor = self.factor[position]
        cells = tuple(r // f for r, f in zip(self.roi, factor))
        w = resize(weights[None].float(), cells)[0]
        imp = self._window_weight(cells)
        start = (start[0] - self.base, *start[1:]) if self.held != self.shape else start
        region = tuple(slice(s // f, s // f + c) for s, f, c in zip(start, factor, cells))
        self.sums[position][(plane, slice(None), *region)] += w * imp
        self.weights[position][(plane, slice(None), *region)] += imp

    def positions(self) -> list[str]:
        return list(self.sums)

    def advance(self, base: int) -> None:
        """Streamed 3D: drop the held voxels before ``base`` along the first axis and start empty ones after."""
        for position in self.sums:
            shift = (base - self.base) // self.factor[position][0]
            for acc in (self.sums[position], self.weights[position]):
                shift_planes(acc[0], shift)
        self.base = base

    def cell_plane(self, position: str, index: int) -> torch.Tensor:
        """Streamed 3D: mean gate weights ``[E, *cells]`` of cell plane ``index`` (counted from the volume start)."""
        i = index - self.base // self.factor[position][0]
        return self.sums[position][0, :, i] / self.weights[position][0, :, i].clamp_min(1e-12)

    def n_experts(self, position: str) -> int:
        return self.sums[position].shape[1]

    def mean_cells(self, position: str) -> torch.Tensor:
        """Mean gate weights ``[planes, E, *cells]`` of one position."""
        return self.sums[position] / self.weights[position].clamp_min(1e-12)

    def expert_cells_upsampled(self, position: str, plane: int, expert: int) -> torch.Tensor:
        """Mean weight of one expert on the padded work grid ``[*padded]`` (float32, one image in size)."""
        cells = self.sums[position][plane, expert] / self.weights[position][plane, 0].clamp_min(1e-12)
        padded = tuple(c * f for c, f in zip(cells.shape, self.factor[position]))
        return resize(cells[None, None], padded)[0, 0]

    def full_resolution(
        self, position: str, plane: int, work: Sequence[int], out: Sequence[int]
    ) -> torch.Tensor:
        """Map ``[E, *out]`` (float16) of one plane: upsample cells to the padded grid, crop ``work``, resize.

        Done one expert at a time so the float32 temporaries stay the size of one image.
        """
        crop = tuple(slice(0, w) for w in work)
        result = torch.empty((self.n_experts(position), *out), dtype=torch.float16)
        for e in range(result.shape[0]):
            m = self.expert_cells_upsampled(position, plane, e)[crop]
            result[e] = resize(m[None, None], out)[0, 0].to(torch.float16)
        return result


def shift_planes(x: torch.Tensor, shift: int) -> None:
    """Move planes ``shift..`` of ``x [K, D, ...]`` to the front in place and zero the rest."""
    depth = x.shape[1]
    for i in range(max(0, depth - shift)):  # plane by plane, front to back: never reads an overwritten plane
        x[:, i].copy_(x[:, i + shift])
    x[:, max(0, depth - shift) :].zero_()


def linear_indices(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each output index of a linear resize along one axis: the two input indices and the weight of the
    second, mapped as ``F.interpolate(align_corners=False)`` does (in float32), so slabs resize like the whole."""
    scale = np.float32(n_in) / np.float32(n_out)
    src = scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    src = np.maximum(src, np.float32(0))
    i0 = src.astype(np.int64)
    lam = np.clip(src - i0, 0, 1).astype(np.float32)
    return i0, np.minimum(i0 + 1, n_in - 1), lam


class LinearStream:
    """Planes of a linear resize along axis 0, pulled in increasing order; input planes come from ``produce(i)``
    on demand and at most two are kept. Lets a volume be resized slab by slab (``needs(j)``: the last input
    plane output ``j`` waits for). Returned planes may be cached: do not change them in place."""

    def __init__(self, n_in: int, n_out: int, produce: Callable[[int], torch.Tensor]) -> None:
        self.same = n_in == n_out
        self.i0, self.i1, self.lam = linear_indices(n_in, n_out)
        self.produce = produce
        self.cache: dict[int, torch.Tensor] = {}

    def needs(self, j: int) -> int:
        return int(self.i1[j]) if self.lam[j] > 0 else int(self.i0[j])

    def _input(self, i: int) -> torch.Tensor:
        if i not in self.cache:
            self.cache[i] = self.produce(i)
        return self.cache[i]

    def get(self, j: int) -> torch.Tensor:
        if self.same:
            return self.produce(j)
        i0, i1, lam = int(self.i0[j]), int(self.i1[j]), float(self.lam[j])
        for i in [i for i in self.cache if i < i0]:
            del self.cache[i]
        if lam == 0:
            return self._input(i0)
        return self._input(i0) * (1 - lam) + self._input(i1) * lam
