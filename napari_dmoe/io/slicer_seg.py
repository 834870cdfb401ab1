"""3D Slicer segmentation files (.seg.nrrd) via slicerio: label maps with segment names, colours and geometry.

Writing: one segment per class (label k -> segment "class_names[k]", a colour each, Slicer's label value k), the
grid of the image the labels were made on (its affine when known, else spacing and origin in our LPS view), so
Slicer lays the segmentation exactly over the volume. Reading: the label map in napari's axis-aligned LPS view (the
axes brought to the closest L, P, S order, as our NIfTI reader does), with the segments (value, name, colour) in
``meta["segments"]`` so napari shows Slicer's colours and a save writes them back.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from napari_dmoe.colors import SEGMENT_COLORS  # shared with the Slicer module
from napari_dmoe.io.volume import ImageReadError, ImageWriteError, Volume

SUFFIX = ".seg.nrrd"
_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # LPS <-> RAS (its own inverse)


def is_seg_nrrd(path: str | Path) -> bool:
    return str(path).lower().endswith(SUFFIX)


def default_colors(n: int) -> list[tuple[float, float, float]]:
    """Colours of segments 1..n."""
    return [SEGMENT_COLORS[i % len(SEGMENT_COLORS)] for i in range(n)]


def _ijk_to_lps(labels_zyx: np.ndarray, like: Volume | None) -> np.ndarray:
    """4x4 from the (i, j, k) = (x, y, z) voxel index to LPS mm, for labels on the grid of ``like``."""
    if like is not None and like.affine is not None and labels_zyx.ndim == 3 and like.affine.shape == (4, 4):
        zyx_to_ras = np.asarray(like.affine, dtype=float)
        xyz_to_ras = zyx_to_ras.copy()
        xyz_to_ras[:3, :3] = zyx_to_ras[:3, [2, 1, 0]]
        return _TO_RAS @ xyz_to_ras
    spacing = tuple(like.spacing) if like is not None else (1.0,) * labels_zyx.ndim
    origin = tuple(like.origin) if like is not None else (0.0,) * labels_zyx.ndim
    spacing = (1.0,) * (3 - len(spacing)) + spacing  # a 2D image is one slice
    origin = (0.0,) * (3 - len(origin)) + origin
    # our axis-aligned LPS view: x, y, z indices grow towards L, P, S; origin is (z, y, x)
    out = np.diag([spacing[2], spacing[1], spacing[0], 1.0])
    out[:3, 3] = origin[::-1]
    return out


def write_seg_nrrd(path: str | Path, labels: np.ndarray, like: Volume | None = None, *,
                   class_names: Sequence[str] = (), colors: Sequence[Sequence[float]] | None = None,
                   provenance: Any = None) -> Path:
    """Write a label map ((z, y, x) or (y, x), napari order) as a Slicer segmentation, atomically.

    Segment k is label value k, named ``class_names[k]`` ("label k" without one) and coloured ``colors[k - 1]``
    (RGB 0..1; default ``SEGMENT_COLORS``). Every class gets a segment, present in the mask or not, so the file
    always lists the model's classes."""
    import slicerio

    from napari_dmoe.io.files import atomic_write

    path = Path(path)
    labels = np.asarray(labels)
    if labels.ndim not in (2, 3):
        raise ImageWriteError(f"{path}: .seg.nrrd holds 2D or 3D labels, got shape {labels.shape}")
    if labels.size and (labels.dtype.kind not in "iub" or labels.min() < 0):
        raise ImageWriteError(f"{path}: labels must be non-negative integers")
    top = int(labels.max()) if labels.size else 0
    n = max(len(class_names) - 1, top)
    if n > 65535:
        raise ImageWriteError(f"{path}: label value {top} is too large for a Slicer segmentation; relabel")
    colors = list(colors) if colors is not None else default_colors(n)
    if len(colors) < n:
        colors += default_colors(n)[len(colors):]
    voxels = labels if labels.ndim == 3 else labels[None]
    segments = []
    for k in range(1, n + 1):
        name = str(class_names[k]).strip() if k < len(class_names) else ""
        segments.append({"id": f"Segment_{k}", "labelValue": k, "layer": 0, "name": name or f"label {k}",
                         "color": [float(c) for c in list(colors[k - 1])[:3]]})
    seg = {"voxels": np.ascontiguousarray(voxels.transpose(2, 1, 0)).astype(np.uint8 if n < 256 else np.uint16),
           "ijkToLPS": _ijk_to_lps(voxels, like), "segments": segments,
           "containedRepresentationNames": ["Binary labelmap"], "masterRepresentation": "Binary labelmap"}
    if provenance:  # one header field (io/provenance.py); Slicer keeps fields it does not know
        from napari_dmoe.io.provenance import KEY, to_json

        seg[KEY] = to_json(provenance)
    if not path.parent.is_dir():
        raise ImageWriteError(f"{path.parent}: folder does not exist")
    atomic_write(path, lambda tmp: slicerio.write_segmentation(str(tmp), seg))
    return path


# the most a deflate stream expands (1032:1); bzip2 can expand far more, so it is bounded by the voxel limit alone
_GZIP_RATIO = 1032


_MAX_HEADER = 2**20  # bytes: a NRRD header is text of a few kB; a longer one is not a header


def _nrrd_header(path: Path) -> tuple[dict[str, str], int]:
    """The NRRD header's fields (``name: value``; lower-case names, key/value pairs ``k:=v`` left out) and the byte
    offset of the data, read without the voxels (NRRD format: a magic line, fields, an empty line)."""
    with open(path, "rb") as f:
        head = f.read(_MAX_HEADER)
    ends = [(i, len(sep)) for sep in (b"\n\n", b"\r\n\r\n") if (i := head.find(sep)) >= 0]
    if not head.startswith(b"NRRD") or not ends:
        raise ImageReadError(f"{path}: not a Slicer segmentation (no NRRD header ending in an empty line)")
    end, width = min(ends)
    fields = {}
    for line in head[:end].decode("latin-1").splitlines()[1:]:
        if line.startswith("#") or ":=" in line or ":" not in line:
            continue
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    return fields, end + width


def _check_seg_nrrd_size(path: Path) -> None:
    """The header's ``sizes`` within ``DMOE_MAX_VOXELS`` and, raw or gzip, within what the file can hold: a small
    file claiming gigabytes is refused from its header (issue 28: a 5 MB file reached 5.4 GB)."""
    import math

    from napari_dmoe.limits import check_grid

    header, data_start = _nrrd_header(path)
    try:
        sizes = [int(n) for n in header["sizes"].split()]
    except (KeyError, ValueError):
        raise ImageReadError(f"{path}: header field sizes is missing or not a list of integers; save the "
                             "segmentation again from Slicer") from None
    check_grid(sizes, f"{path}: header field sizes", ImageReadError)
    if header.get("data file") or header.get("datafile"):
        raise ImageReadError(f"{path}: its voxels are in a separate data file; save the segmentation as one "
                             ".seg.nrrd file in Slicer")
    encoding = str(header.get("encoding", "raw")).lower()
    room = max(0, path.stat().st_size - data_start)
    have = {"raw": room, "gzip": room * _GZIP_RATIO, "gz": room * _GZIP_RATIO}.get(encoding)
    if have is not None and math.prod(sizes) > have:  # at least one byte a voxel
        raise ImageReadError(f"{path}: header field sizes says {tuple(sizes)} voxels but the file holds {room} bytes "
                             f"of {encoding} data; the file is truncated or its header is wrong")


def read_seg_nrrd(path: str | Path) -> Volume:
    """A Slicer .seg.nrrd as a label Volume in napari's axis-aligned LPS view; ``meta["segments"]`` lists
    ``{"value", "name", "color"}``. Overlapping segments (several layers) are refused: napari labels hold one
    label per voxel."""
    import slicerio
    from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file; check the path")
    _check_seg_nrrd_size(path)  # before slicerio allocates the voxels the header claims
    try:
        seg = slicerio.read_segmentation(str(path))
    except Exception as err:  # pynrrd / slicerio raise several types for a bad file
        raise ImageReadError(f"{path}: not a readable Slicer segmentation ({err})") from err
    voxels = np.asarray(seg["voxels"])
    if voxels.ndim == 4:
        raise ImageReadError(
            f"{path}: its segments overlap ({voxels.shape[0]} layers), and napari labels hold one label per voxel; "
            "in Slicer, make the segments not overlap (Segment Editor > Masking: 'Overwrite other segments') and "
            "save again")
    if voxels.ndim != 3:
        raise ImageReadError(f"{path}: expected a 3D label map, got shape {voxels.shape}")
    try:
        ijk_to_lps = np.asarray(seg["ijkToLPS"], dtype=float)
    except (KeyError, TypeError, ValueError) as err:
        raise ImageReadError(f"{path}: header fields space directions / space origin are unreadable ({err})") from err
    columns = np.linalg.norm(ijk_to_lps[:3, :3], axis=0) if ijk_to_lps.shape == (4, 4) else np.zeros(3)
    if not np.all(np.isfinite(ijk_to_lps)) or columns.min() <= 1e-6 or \
            abs(float(np.linalg.det(ijk_to_lps[:3, :3]))) <= 1e-6 * float(np.prod(columns)):
        raise ImageReadError(f"{path}: header fields space directions / space origin give no usable geometry (NaN, "
                             "infinite, zero-length or parallel axes); save the segmentation again from Slicer")
    ornt = io_orientation(ijk_to_lps)  # closest L, P, S axis (and sign) of each voxel axis
    to_canonical = ornt_transform(ornt, np.array([[0, 1.0], [1, 1.0], [2, 1.0]]))
    xyz = apply_orientation(voxels, to_canonical)
    lps = ijk_to_lps @ inv_ornt_aff(to_canonical, voxels.shape)
    array = np.ascontiguousarray(xyz.transpose(2, 1, 0))
    spacing = tuple(float(s) for s in np.linalg.norm(lps[:3, :3], axis=0)[::-1])
    origin = tuple(float(o) for o in lps[:3, 3][::-1])
    zyx_to_ras = _TO_RAS @ lps
    zyx_to_ras[:3, :3] = zyx_to_ras[:3, [2, 1, 0]]
    warnings = []
    if not np.allclose(lps[:3, :3], np.diag(np.diag(lps[:3, :3])), atol=1e-3):
        warnings.append("oblique segmentation: napari shows it axis-aligned (scale and translate only)")
    segments = [{"value": int(s.get("labelValue", i + 1)), "name": str(s.get("name", "")),
                 "color": [float(c) for c in s.get("color", default_colors(i + 1)[i])]}
                for i, s in enumerate(seg.get("segments", []))]
    meta = {"source": str(path), "format": "seg.nrrd", "modality": "SEG", "orientation": "LPS",
            "spacing_known": True, "warnings": warnings, "segments": segments}
    if array.shape[0] == 1:  # one slice: a 2D image's segmentation
        return Volume(array=array[0], spacing=spacing[1:], origin=origin[1:], affine=None, meta=meta)
    return Volume(array=array, spacing=spacing, origin=origin, affine=zyx_to_ras, meta=meta)
