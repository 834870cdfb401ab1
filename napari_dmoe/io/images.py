"""Read medical images into one `Volume` type and write label maps back with the source geometry.

Axis order is napari's: 3D arrays are (z, y, x), 2D ones (y, x) or (y, x, c) for RGB; `spacing` and
`origin` follow the same order. NIfTI volumes are reoriented to the closest LPS+ voxel order (DICOM's
patient frame, so napari's axial view is radiological: anterior up, patient's right on the left) with nibabel, and the file's own affine is kept in `meta` so `write_labels` can undo the reorientation
exactly. nibabel / pydicom / imageio / tifffile are imported inside the functions that need them so that
importing this module (e.g. from the napari reader) stays fast.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from napari_dmoe.limits import check_grid

from napari_dmoe.io.formats import (  # noqa: F401 (suffix_of: re-exported, callers import it from here)
    DICOM_SUFFIXES, NIFTI_SUFFIXES, PLAIN_SUFFIXES, TIFF_SUFFIXES, suffix_of,
)
from napari_dmoe.io.volume import ImageReadError, ImageWriteError, Volume, layer_spacing  # noqa: F401 (re-exported)


def read_image(path: str | Path) -> Volume:
    """Read a NIfTI file, a DICOM file or series folder, or a PNG/JPG/TIFF image into a `Volume`."""
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"{path}: no such file or folder; check the path")
    require_regular(path, ImageReadError)
    if path.is_dir():
        from napari_dmoe.io.dicom import read_dicom_series

        return read_dicom_series(path)
    suffix = suffix_of(path)
    if path.name.lower().endswith(".seg.nrrd"):  # 3D Slicer segmentation: a label map with segment names
        from napari_dmoe.io.slicer_seg import read_seg_nrrd

        return read_seg_nrrd(path)
    if suffix in NIFTI_SUFFIXES:
        from napari_dmoe.io.nifti import read_nifti

        return read_nifti(path)
    if suffix in PLAIN_SUFFIXES:
        return _read_tiff(path) if suffix in TIFF_SUFFIXES else _read_plain(path)
    from napari_dmoe.io.dicom import is_dicom_file, read_dicom_file

    if suffix in DICOM_SUFFIXES or is_dicom_file(path):  # DICOM files often have no suffix at all
        return read_dicom_file(path)
    raise ImageReadError(
        f"{path}: unsupported file type {suffix or '(no suffix)'!r}; napari-dmoe reads NIfTI (.nii, .nii.gz), "
        f"DICOM (.dcm or a series folder), PNG, JPG, TIFF and 3D Slicer segmentations (.seg.nrrd)"
    )


def require_regular(path: Path, error: type[Exception]) -> None:
    """Refuse a pipe, socket or device given as a file: reading one would hang or never end."""
    import stat

    mode = os.stat(path).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise error(f"{path}: not a regular file or folder (a pipe, socket or device); give an image file")


# -- PNG / JPG / TIFF ------------------------------------------------------------------------------------
def _finish_plain(path: Path, array: np.ndarray, rgb: bool, fmt: str, warnings: list[str]) -> Volume:
    spatial = array.ndim - (1 if rgb else 0)
    meta = {
        "source": str(path),
        "format": fmt,
        "modality": "photo" if rgb else "unknown",
        "orientation": "image",
        "rgb": rgb,
        "spacing_known": False,  # pixel size is not stored reliably in these formats
        "warnings": warnings,
    }
    return Volume(array=array, spacing=(1.0,) * spatial, origin=(0.0,) * spatial, affine=None, meta=meta)


def _colour_axes(path: Path, array: np.ndarray, warnings: list[str]) -> tuple[np.ndarray, bool]:
    """Grey -> (y, x); grey+alpha -> grey; RGB -> (y, x, 3); RGBA -> RGB (alpha dropped)."""
    if array.ndim == 2:
        return array, False
    if array.ndim == 3 and array.shape[-1] in (2, 4):
        warnings.append("alpha channel dropped")
        array = array[..., :-1]
    if array.ndim == 3 and array.shape[-1] == 1:
        return array[..., 0], False
    if array.ndim == 3 and array.shape[-1] == 3:
        return array, True
    raise ImageReadError(f"{path}: image of shape {array.shape} is neither grey nor RGB")


def _read_plain(path: Path) -> Volume:
    import imageio.v3 as iio

    try:
        from PIL import Image

        with Image.open(path) as im:  # the header only: refuse a size the memory limit forbids before decoding
            width, height = im.size
        check_grid((height, width), f"{path}: image size", ImageReadError)
        array = np.asarray(iio.imread(path))
    except ImageReadError:
        raise
    except Exception as err:  # imageio's plugins raise their own types
        raise ImageReadError(f"{path}: not a readable image ({err}); the file may be corrupt") from err
    warnings: list[str] = []
    array, rgb = _colour_axes(path, array, warnings)
    return _finish_plain(path, array, rgb, suffix_of(path).lstrip("."), warnings)


# A damaged header can claim far more pixels than the file holds, and tifffile allocates the claimed size before
# it finds the strips missing (a 520-byte file asked for 200 MiB). Uncompressed pixels must fit in the file;
# compressed ones may expand at most this much (an all-zero deflated mask reaches about 1000x), above a floor.
TIFF_MAX_RATIO = 4096
TIFF_FLOOR_BYTES = 16 * 2**20


def _check_tiff_bytes(path: Path, declared: int, compressed: bool) -> None:
    size = path.stat().st_size
    allowed = max(TIFF_FLOOR_BYTES, size * TIFF_MAX_RATIO) if compressed else size
    if declared > allowed:
        raise ImageReadError(
            f"{path}: the TIFF header declares {declared} bytes of pixels but the file has {size} bytes"
            f"{' (compressed)' if compressed else ''}; the file is damaged or truncated"
        )


def _read_tiff(path: Path) -> Volume:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            check_grid(series.shape, f"{path}: TIFF size", ImageReadError)  # before the pixels are allocated
            _check_tiff_bytes(path, int(np.prod(series.shape)) * series.dtype.itemsize,
                              compressed=int(tif.pages[0].compression) != 1)
            array, axes = series.asarray(), series.axes
    except ImageReadError:
        raise
    except Exception as err:  # tifffile raises TiffFileError, ValueError, ...
        raise ImageReadError(f"{path}: not a readable TIFF file ({err}); the file may be corrupt") from err
    warnings: list[str] = []
    if "S" in axes and array.shape[-1] in (2, 3, 4):  # samples per pixel: colour image
        array, rgb = _colour_axes(path, array, warnings)
        if array.ndim != 3:
            raise ImageReadError(f"{path}: colour TIFF with axes {axes!r} is not supported; save single images")
        return _finish_plain(path, array, rgb, "tiff", warnings)
    array = np.squeeze(array)
    if array.ndim not in (2, 3):
        raise ImageReadError(
            f"{path}: TIFF has shape {array.shape} (axes {axes!r}); napari-dmoe reads 2D images and 3D stacks only"
        )
    return _finish_plain(path, array, False, "tiff", warnings)


# -- writing ---------------------------------------------------------------------------------------------
def _label_dtype(labels: np.ndarray) -> np.dtype:
    if labels.size and (labels.min() < 0 or not np.all(np.equal(np.mod(labels, 1), 0))):
        raise ImageWriteError("labels must be non-negative integers")
    top = int(labels.max()) if labels.size else 0
    if top <= np.iinfo(np.uint8).max:
        return np.dtype(np.uint8)
    if top <= np.iinfo(np.uint16).max:
        return np.dtype(np.uint16)
    raise ImageWriteError(f"label value {top} does not fit 16 bits; relabel to fewer classes")


def write_labels(path: str | Path, labels: np.ndarray, like: Volume | None = None, *,
                 class_names: Sequence[str] = (), algorithm: Any = None, provenance: Any = None) -> Path:
    """Write a label map as NIfTI (.nii/.nii.gz) in the geometry of `like`, as PNG/TIFF, or as DICOM SEG (.dcm).

    `labels` is in the napari order of `like.array` (same spatial shape). For a NIfTI source the file
    gets the source's affine and voxel order back exactly. DICOM SEG needs `like` read from DICOM (it references
    the source images); `class_names` name its segments and `algorithm` (`dicom_seg.SegAlgorithm`) says what
    made them. Other formats ignore both. `provenance` (a JSON-able mapping: model, attribute, forced, fit findings,
    ...) is saved with the mask where the format has room, else beside it (``io/provenance.py``).
    """
    path = Path(path)
    labels = np.asarray(labels)
    if like is not None and tuple(labels.shape) != like.spatial_shape:
        raise ImageWriteError(
            f"labels have shape {labels.shape} but the image {like.meta.get('source', '')} has spatial shape "
            f"{like.spatial_shape}; write labels made on that image"
        )
    labels = labels.astype(_label_dtype(labels))
    suffix = suffix_of(path)
    if not path.parent.exists():
        raise ImageWriteError(f"{path.parent}: folder does not exist")
    if path.name.lower().endswith(".seg.nrrd"):  # 3D Slicer: segments named after the classes, coloured
        from napari_dmoe.io.slicer_seg import write_seg_nrrd

        return write_seg_nrrd(path, labels, like, class_names=class_names, provenance=provenance)
    if suffix == ".dcm":
        from napari_dmoe.io.dicom_seg import require_dicom_source, write_dicom_seg

        require_dicom_source(like, path)
        return write_dicom_seg(path, labels, like, class_names=class_names, algorithm=algorithm)
    from napari_dmoe.io.files import atomic_write  # a killed batch never leaves a half mask under its name

    if suffix in NIFTI_SUFFIXES:
        from napari_dmoe.io.nifti import write_nifti

        atomic_write(path, lambda tmp: write_nifti(tmp, labels, like, gz=suffix == ".nii.gz", provenance=provenance))
    elif suffix == ".png":
        if labels.ndim != 2:
            raise ImageWriteError(f"PNG holds 2D labels only, got shape {labels.shape}; use .nii.gz or .tif")
        import imageio.v3 as iio

        atomic_write(path, lambda tmp: iio.imwrite(tmp, labels, extension=".png"))
    elif suffix in TIFF_SUFFIXES:
        if labels.ndim not in (2, 3):
            raise ImageWriteError(f"TIFF labels must be 2D or 3D, got shape {labels.shape}")
        import tifffile

        atomic_write(path, lambda tmp: tifffile.imwrite(tmp, labels))
    else:
        raise ImageWriteError(f"{path}: cannot write labels as {suffix or '(no suffix)'!r}; use .nii.gz, .png, .tif, "
                              f".seg.nrrd (3D Slicer) or .dcm (DICOM SEG, for DICOM sources)")
    if provenance and suffix in (".png", *TIFF_SUFFIXES):  # no room in the file: <name>.png.json beside it
        from napari_dmoe.io.provenance import write_sidecar

        write_sidecar(path, provenance)
    return path


def write_volume(path: str | os.PathLike, array: np.ndarray, spacing: Sequence[float],
                 origin: Sequence[float] | None = None) -> Path:
    """A (z, y, x) array (any dtype) as NIfTI with voxel size ``spacing`` and LPS ``origin`` (z, y, x), written so
    that ``read_image`` gives back the same array, spacing and origin."""
    path = Path(path)
    like = Volume(array=array, spacing=tuple(spacing), origin=tuple(origin or (0.0,) * len(spacing)), affine=None,
                  meta={})
    from napari_dmoe.io.files import atomic_write
    from napari_dmoe.io.nifti import write_nifti

    atomic_write(path, lambda tmp: write_nifti(tmp, np.asarray(array), like, gz=suffix_of(path) == ".nii.gz"))
    return path
