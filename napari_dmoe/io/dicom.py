"""DICOM files and series folders -> `Volume` (pydicom, imported lazily).

A folder is read as one series: files are grouped by SeriesInstanceUID, the series with most slices wins
(the others are listed in ``meta["other_series"]`` with a warning), slices are sorted by their position
along the slice normal, and RescaleSlope/Intercept (the modality LUT) are applied per slice.
Geometry: spacing (z, y, x) from slice positions and PixelSpacing; origin is the first voxel's position
projected on (normal, column, row) directions in the patient (LPS) frame; `affine` maps (z, y, x) to RAS mm.
"""
from __future__ import annotations

import io
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from napari_dmoe.io.volume import ImageReadError, Volume


def is_dicom_file(path: str | Path) -> bool:
    """True when the file carries the DICOM preamble ('DICM' at byte 128)."""
    from pydicom.misc import is_dicom

    try:
        return Path(path).is_file() and is_dicom(str(path))
    except OSError:
        return False


def folder_has_dicom(folder: str | Path) -> bool:
    """True when any file directly inside `folder` is DICOM (cheap check, reads 132 bytes per file)."""
    folder = Path(folder)
    return folder.is_dir() and any(is_dicom_file(p) for p in folder.iterdir())


class _SizedReader(io.BufferedReader):
    """A file whose reads never ask for more than it holds. pydicom reads an element with ``read(length)`` and
    Python allocates ``length`` bytes before reading: a damaged length field (4 GB in a 40 KB file) would ask
    for gigabytes."""

    def __init__(self, path: Path) -> None:
        raw = io.FileIO(path, "rb")
        super().__init__(raw)
        self._size = os.fstat(raw.fileno()).st_size

    def read(self, size: int | None = -1) -> bytes:
        if size is not None and size >= 0:
            size = max(0, min(size, self._size - self.tell()))
        return super().read(size)


def _dcmread(path: Path, header_only: bool = False) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with _SizedReader(path) as f:
            ds = pydicom.dcmread(f, stop_before_pixels=header_only)
            ds.filename = str(path)  # what pydicom records when given a path (DICOM SEG export reads it)
            return ds
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError) as err:
        raise ImageReadError(f"{path}: not a readable DICOM file ({err}); the file may be corrupt") from err


def _pixels(ds: Any, path: Path) -> np.ndarray:
    """Pixel data with the modality LUT (RescaleSlope/Intercept) applied."""
    from pydicom.pixels import apply_modality_lut

    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageReadError(
            f"{path}: DICOM file has no pixel data (e.g. a DICOMDIR, report or presentation state); "
            f"open an image file or the series folder instead"
        )
    try:
        raw = ds.pixel_array
    except Exception as err:  # missing decoder for a compressed transfer syntax, truncated data, ...
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise ImageReadError(
            f"{path}: cannot decode the pixel data (transfer syntax {syntax}: {err}); for compressed DICOM "
            f"install a decoder such as `pylibjpeg[all]`"
        ) from err
    if int(getattr(ds, "SamplesPerPixel", 1)) > 1:
        return raw  # colour: no modality LUT
    return apply_modality_lut(raw, ds)


def _compact(array: np.ndarray) -> np.ndarray:
    """int16 when the rescaled values are integers that fit (typical CT), else float32."""
    if np.issubdtype(array.dtype, np.integer) and array.dtype.itemsize <= 2:
        return array
    info = np.iinfo(np.int16)
    if array.size and np.all(np.mod(array, 1) == 0) and array.min() >= info.min and array.max() <= info.max:
        return array.astype(np.int16)
    return array.astype(np.float32)


def _directions(ds: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    iop = getattr(ds, "ImageOrientationPatient", None)
    if iop is None or len(iop) != 6:
        return None
    row, col = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    return row, col, np.cross(row, col)


def _pixel_spacing(ds: Any) -> tuple[float, float]:
    ps = getattr(ds, "PixelSpacing", None) or getattr(ds, "ImagerPixelSpacing", None)
    return (float(ps[0]), float(ps[1])) if ps is not None else (1.0, 1.0)


def _meta(path: Path, ds: Any, warnings: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "source": str(path),
        "format": "dicom",
        "modality": str(getattr(ds, "Modality", "unknown")),
        "orientation": "DICOM patient (LPS), rows/columns as stored",
        "series_uid": str(getattr(ds, "SeriesInstanceUID", "")),
        "series_description": str(getattr(ds, "SeriesDescription", "")),
        # the attributes a model may be conditioned on (mapped onto its vocabulary by inference.patient)
        "patient": {"age": str(getattr(ds, "PatientAge", "") or ""), "sex": str(getattr(ds, "PatientSex", "") or "")},
        "spacing_known": "PixelSpacing" in ds,
        "warnings": warnings,
        **extra,
    }


def _zyx_affine(first_pos: np.ndarray, dirs: tuple[np.ndarray, np.ndarray, np.ndarray],
                spacing: tuple[float, float, float]) -> np.ndarray:
    """(z, y, x) index -> RAS mm (DICOM is LPS, so x and y flip sign)."""
    row, col, normal = dirs
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2] = normal * spacing[0], col * spacing[1], row * spacing[2]
    lps[:3, 3] = first_pos
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def read_dicom_file(path: str | Path) -> Volume:
    """One DICOM file: a 2D (y, x) image, or (z, y, x) for a multi-frame file."""
    path = Path(path)
    ds = _dcmread(path)
    array = _compact(_pixels(ds, path))
    warnings: list[str] = []
    dy, dx = _pixel_spacing(ds)
    rgb = int(getattr(ds, "SamplesPerPixel", 1)) > 1
    n_frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if n_frames > 1:
        dz = float(getattr(ds, "SpacingBetweenSlices", 0) or getattr(ds, "SliceThickness", 0) or 1.0)
        warnings.append("multi-frame DICOM: slice spacing taken from SpacingBetweenSlices/SliceThickness")
        spacing: tuple[float, ...] = (dz, dy, dx)
    else:
        spacing = (dy, dx)
    dirs = _directions(ds)
    pos = np.asarray(getattr(ds, "ImagePositionPatient", [0.0, 0.0, 0.0]), float)
    if dirs is not None:
        origin = (float(pos @ dirs[1]), float(pos @ dirs[0]))
        if len(spacing) == 3:
            origin = (float(pos @ dirs[2]),) + origin
    else:
        origin = (0.0,) * len(spacing)
    affine = _zyx_affine(pos, dirs, spacing) if dirs is not None and len(spacing) == 3 and not rgb else None
    meta = _meta(path, ds, warnings, rgb=rgb, files=[str(path)],
                 sop_instance_uids=[str(getattr(ds, "SOPInstanceUID", ""))])
    return Volume(array=array, spacing=spacing, origin=origin, affine=affine, meta=meta)


def _group_series(paths: list[Path]) -> tuple[dict[str, list[tuple[Path, Any]]], int]:
    """Image headers grouped by SeriesInstanceUID; returns the groups and the number of files skipped."""
    groups: dict[str, list[tuple[Path, Any]]] = defaultdict(list)
    skipped = 0
    for path in sorted(p for p in paths if p.is_file()):
        if not is_dicom_file(path):
            skipped += 1  # READMEs, thumbnails, DICOMDIR-less junk: not ours to judge
            continue
        ds = _dcmread(path, header_only=True)
        if "Rows" not in ds:  # DICOMDIR, structured reports: no image in them
            skipped += 1
            continue
        groups[str(getattr(ds, "SeriesInstanceUID", "unknown"))].append((path, ds))
    return groups, skipped


def _sort_slices(items: list[tuple[Path, Any]], warnings: list[str]) -> tuple[list[tuple[Path, Any]], np.ndarray | None]:
    """Sort by ImagePositionPatient projected on the slice normal; fall back to InstanceNumber."""
    dirs = _directions(items[0][1])
    if dirs is not None and all("ImagePositionPatient" in ds for _, ds in items):
        keys = np.array([np.asarray(ds.ImagePositionPatient, float) @ dirs[2] for _, ds in items])
        order = np.argsort(keys, kind="stable")
        return [items[i] for i in order], keys[order]
    warnings.append("slices lack ImagePositionPatient/ImageOrientationPatient: sorted by InstanceNumber")
    return sorted(items, key=lambda it: int(getattr(it[1], "InstanceNumber", 0) or 0)), None


SPACING_TOLERANCE = 0.01  # relative: slice gaps may differ by rounding, not by a missing or extra slice


def _uniform_spacing(folder: Path, files: list[Path], positions: np.ndarray) -> float:
    """The slice spacing (mm) when the slices are evenly spaced along their normal; otherwise refuse: stacking
    them as if contiguous would put every slice after a gap at the wrong place (and volumes grow or shrink)."""
    gaps = np.diff(positions)
    same = np.flatnonzero(gaps < 1e-3)
    if same.size:
        i = int(same[0])
        raise ImageReadError(
            f"{folder}: {files[i].name} and {files[i + 1].name} lie at the same position ({positions[i]:.4g} mm along "
            "the slice normal): echoes, time points or a duplicated file; napari-dmoe reads one 3D volume, put "
            "one of each position in the folder (or export the series again)")
    dz = float(np.median(gaps))
    odd = np.flatnonzero(np.abs(gaps - dz) > max(SPACING_TOLERANCE * dz, 1e-3))
    if odd.size:
        i = int(odd[0])
        hint = f" ({gaps[i] / dz:.3g} slices: missing slice(s)?)" if gaps[i] > dz else ""
        raise ImageReadError(
            f"{folder}: slice positions are not evenly spaced: {gaps[i]:.4g} mm between {files[i].name} and "
            f"{files[i + 1].name}{hint}, {dz:.4g} mm elsewhere ({odd.size} uneven gap(s)); napari-dmoe does not "
            "stack such slices as if contiguous. Export the complete series, or resample it to even spacing first")
    return dz


def read_dicom_series(folder: str | Path | list[str | Path]) -> Volume:
    """A folder of DICOM slices (or a list of slice files) -> (z, y, x) Volume of the largest series."""
    if isinstance(folder, (list, tuple)):
        paths = [Path(p) for p in folder]
        missing = [str(p) for p in paths if not p.is_file()]
        if not paths or missing:
            raise ImageReadError(f"DICOM slice file(s) not found: {missing[:5]}; check the paths")
        folder = paths[0].parent
    else:
        folder = Path(folder)
        paths = list(folder.iterdir()) if folder.is_dir() else []
    groups, skipped = _group_series(paths)
    if not groups:
        raise ImageReadError(f"{folder}: no DICOM images in this folder; pick the folder that holds the .dcm slices")
    warnings: list[str] = []
    uid = max(groups, key=lambda u: (len(groups[u]), u))
    others = [{"series_uid": u, "n_slices": len(v)} for u, v in sorted(groups.items()) if u != uid]
    if others:
        warnings.append(
            f"folder holds {len(groups)} series; read {uid} ({len(groups[uid])} slices), ignored "
            + ", ".join(f"{o['series_uid']} ({o['n_slices']} slices)" for o in others)
        )
    items, positions = _sort_slices(groups[uid], warnings)
    # checked before the pixels are read: a gap in the series is refused at once
    gap = _uniform_spacing(folder, [p for p, _ in items], positions) if positions is not None and len(items) > 1 else None
    slices = []
    for path, _ in items:
        ds = _dcmread(path)
        pixels = _pixels(ds, path)
        if slices and pixels.shape != slices[0].shape:
            raise ImageReadError(
                f"{path}: slice size {pixels.shape} differs from {slices[0].shape} in {items[0][0].name}; "
                f"the series is inconsistent, remove the odd file or export the series again"
            )
        slices.append(pixels)
    first = items[0][1]
    array = _compact(np.stack(slices).astype(np.float32 if any(s.dtype.kind == "f" for s in slices) else np.int32))
    dy, dx = _pixel_spacing(first)
    dz = float(getattr(first, "SpacingBetweenSlices", 0) or getattr(first, "SliceThickness", 0) or 1.0)
    if gap is not None:
        dz = gap
    spacing = (dz, dy, dx)
    dirs = _directions(first)
    pos = np.asarray(getattr(first, "ImagePositionPatient", [0.0, 0.0, 0.0]), float)
    if dirs is not None:
        origin = (float(pos @ dirs[2]), float(pos @ dirs[1]), float(pos @ dirs[0]))
        affine = _zyx_affine(pos, dirs, spacing)
    else:
        origin, affine = (0.0, 0.0, 0.0), None
    # the sorted files and their SOPInstanceUIDs: plane z of the array is files[z] (DICOM SEG export refers to it)
    meta = _meta(folder, first, warnings, rgb=False, n_files_skipped=skipped, other_series=others,
                 files=[str(p) for p, _ in items],
                 sop_instance_uids=[str(getattr(ds, "SOPInstanceUID", "")) for _, ds in items])
    return Volume(array=array, spacing=spacing, origin=origin, affine=affine, meta=meta)
