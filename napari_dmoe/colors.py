"""Segment colours and the segment table shared by every front end: the .seg.nrrd writer (io/slicer_seg.py), the
3D Slicer module and napari's result layers, so a class looks the same everywhere.

A leaf with no imports at all: the Slicer module loads this file by path (like client.py), without the package.
"""
from __future__ import annotations

from typing import Sequence

# matplotlib's tab10 without grey, RGB 0..1 as Slicer stores them; cycled for many classes
SEGMENT_COLORS = (
    (0.839, 0.153, 0.157), (0.122, 0.467, 0.706), (0.173, 0.627, 0.173), (1.0, 0.498, 0.055),
    (0.580, 0.404, 0.741), (0.549, 0.337, 0.294), (0.890, 0.467, 0.761), (0.737, 0.741, 0.133),
    (0.090, 0.745, 0.812),
)


def segment_table(class_names: Sequence[str]) -> list[tuple[int, str, tuple[float, float, float]]]:
    """(label value, segment name, colour) for each foreground class 1..n."""
    return [(k, str(name).strip() or f"label {k}", SEGMENT_COLORS[(k - 1) % len(SEGMENT_COLORS)])
            for k, name in enumerate(class_names) if k > 0]
