"""Put a volume sent with any axis directions into the axis-aligned LPS view the engine (and ``dmoe segment``,
through our readers) sees, and put results back on the grid that was sent.

Directions follow ``napari_dmoe.client``: row a of ``direction`` is array axis a in (S, P, L). nibabel finds the
closest axis permutation and flips, as our NIfTI reader does; oblique volumes stay oblique (the engine works on
the voxel grid), only their axes are brought to the nearest canonical order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass
class Reorientation:
    """How array axes map to the canonical view; ``identity`` when nothing needs to move."""

    ornt: np.ndarray  # nibabel orientation: for each array axis, (canonical axis, +1 | -1)
    n: int  # spatial axes (the leading ones)

    @property
    def identity(self) -> bool:
        return bool(np.array_equal(self.ornt, _identity(self.n)))

    def to_canonical(self, array: np.ndarray) -> np.ndarray:
        from nibabel.orientations import apply_orientation, ornt_transform

        if self.identity:
            return array
        return np.ascontiguousarray(apply_orientation(array, ornt_transform(self.ornt, _identity(self.n))))

    def from_canonical(self, array: np.ndarray, leading: int = 0) -> np.ndarray:
        """Back to the sent grid; ``leading`` axes (e.g. experts) come before the spatial ones."""
        from nibabel.orientations import apply_orientation, ornt_transform

        if self.identity:
            return array
        moved = np.moveaxis(array, list(range(leading)), list(range(-leading, 0))) if leading else array
        back = apply_orientation(moved, ornt_transform(_identity(self.n), self.ornt))
        back = np.moveaxis(back, list(range(-leading, 0)), list(range(leading))) if leading else back
        return np.ascontiguousarray(back)

    def shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Size per canonical axis of the ``n`` leading (spatial) axes of ``shape``; later axes (colour) kept."""
        out = [0] * self.n
        for axis, (target, _) in enumerate(self.ornt):
            out[int(target)] = int(shape[axis])
        return (*out, *(int(s) for s in shape[self.n:]))

    def spacing(self, spacing: Sequence[float] | None) -> list[float] | None:
        """Spacing per canonical axis."""
        if spacing is None:
            return None
        out = [0.0] * self.n
        for axis, (target, _) in enumerate(self.ornt):
            out[int(target)] = float(spacing[axis])
        return out


def _identity(n: int) -> np.ndarray:
    return np.array([[i, 1.0] for i in range(n)])


def reorientation(direction: Sequence[Sequence[float]] | None, n: int) -> Reorientation:
    """The reorientation for ``direction`` (None: already canonical) of ``n`` spatial axes."""
    from nibabel.orientations import io_orientation

    if direction is None:
        return Reorientation(_identity(n), n)
    d = np.asarray(direction, dtype=float)
    affine = np.eye(n + 1)
    affine[:n, :n] = d.T  # column a: where array axis a points
    return Reorientation(io_orientation(affine), n)
