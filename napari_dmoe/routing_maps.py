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
from typing import Sequence

import torch
import torch.nn.functional as F
from monai.data.utils import compute_importance_map


def resize(x: torch.Tensor, size: Sequence[int], antialias: bool = False) -> torch.Tensor:
    """Linear resize of ``[N, C, *spatial]`` to ``size`` (bilinear in 2D, trilinear in 3D); no-op if equal."""
    size = tuple(int(s) for s in size)
    if tuple(x.shape[2:]) == size:
        return x
    mode = "bilinear" if len(size) == 2 else "trilinear"
    # torch supports antialiasing only for 2D bilinear; it matters when shrinking photos
    antialias = antialias and len(size) == 2 and any(s < t for s, t in zip(size, x.shape[2:]))
    return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=antialias)


def importance(roi: Sequence[int], blend: str) -> torch.Tensor:
    """MONAI's blending weights for one window (``gaussian`` or ``constant``), float32 on the CPU."""
    return compute_importance_map(tuple(int(r) for r in roi), mode=blend, sigma_scale=0.125, device="cpu")


class RoutingAccumulator:
    """Weighted running mean of gate weights per position, for a stack of ``planes`` images of ``shape``.

    ``add`` takes the gate weights of one window ``[E, *grid]``; ``maps`` returns per-position
    ``[planes, E, *cells]`` means that sum to 1 over E wherever a window contributed.
    """

    def __init__(self, planes: int, shape: Sequence[int], roi: Sequence[int], align: int, blend: str) -> None:
        self.planes, self.shape, self.roi = planes, tuple(shape), tuple(roi)
        self.align, self.blend = align, blend
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
            cells = [math.ceil(s / f) for s, f in zip(self.shape, factor)]
            self.factor[position] = factor
            self.sums[position] = torch.zeros((self.planes, weights.shape[0], *cells), dtype=torch.float32)
            self.weights[position] = torch.zeros((self.planes, 1, *cells), dtype=torch.float32)
        factor = self.factor[position]
        cells = tuple(r // f for r, f in zip(self.roi, factor))
        w = resize(weights[None].float(), cells)[0]
        imp = self._window_weight(cells)
        region = tuple(slice(s // f, s // f + c) for s, f, c in zip(start, factor, cells))
        self.sums[position][(plane, slice(None), *region)] += w * imp
        self.weights[position][(plane, slice(None), *region)] += imp

    def positions(self) -> list[str]:
        return list(self.sums)

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
