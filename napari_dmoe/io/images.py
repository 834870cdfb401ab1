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

NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
PLAIN_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
TIFF_SUFFIXES = (".tif", ".tiff")


class ImageReadError(ValueError):
    """A file or folder cannot be read as an image; the message names it and says what to do."""


class ImageWriteError(ValueError):
    """Labels cannot be written as asked; the message names the problem."""


@dataclass
class Volume:
    """An image in napari axis order with its physical geometry.

    spacing: mm per voxel along each spatial axis (unit spacing with ``meta["spacing_known"] = False`` for
    plain 2D images). origin: position of the first voxel along each axis, in mm. affine: 4x4 from the
    (z, y, x) array index to RAS+ world mm for 3D volumes, else None. meta: ``source``, ``format``,
    ``modality``, ``orientation``, ``warnings`` (list of str) and format-specific geometry.
    """

    array: np.ndarray
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    affine: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def rgb(self) -> bool:
        return bool(self.meta.get("rgb", False))

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape[: len(self.spacing)])


def suffix_of(path: str | Path) -> str:
    """Lower-case suffix, with `.nii.gz` kept whole."""
    name = Path(path).name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return Path(name).suffix


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
        return _read_nifti(path)
    if suffix in PLAIN_SUFFIXES:
        return _read_tiff(path) if suffix in TIFF_SUFFIXES else _read_plain(path)
    from napari_dmoe.io.dicom import is_dicom_file, read_dicom_file

    if suffix in DICOM_SUFFIXES or is_dicom_file(path):  # DICOM files often have no suffix at all
        return read_dicom_file(path)
    raise ImageReadError(
        f"{path}: unsupported file type {suffix or '(no suffix)'!r}; napari-dmoe reads NIfTI (.nii, .nii.gz), "
        f"DICOM (.dcm or a series folder), PNG, JPG, TIFF and 3D Slicer segmentations (.seg.nrrd)"
    )


CANONICAL = "LPS"  # voxel axis order (x, y, z) that NIfTI volumes are reoriented to
MAX_VOXEL_MM = 100.0  # larger voxels are a broken header, not an image (and would make huge resampled grids)


def require_regular(path: Path, error: type[Exception]) -> None:
    """Refuse a pipe, socket or device given as a file: reading one would hang or never end."""
    import stat

    mode = os.stat(path).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise error(f"{path}: not a regular file or folder (a pipe, socket or device); give an image file")


def check_nifti_geometry(path: Path, img: Any) -> None:
    """Refuse zero, negative, NaN or absurd voxel sizes and a NaN or singular affine, naming the field.

    The header is read again as stored: nibabel's loader quietly turns a 0 voxel size into 1 mm and a negative one
    into its absolute value, which is the guess we refuse to make."""
    from nibabel.openers import ImageOpener

    try:
        with ImageOpener(str(path)) as f:
            header = type(img.header).from_fileobj(f, check=False)
    except Exception as err:  # the header nibabel just read cannot be read again: treat like a corrupt file
        raise ImageReadError(f"{path}: not a readable NIfTI header ({err})") from err
    zooms = [float(z) for z in header["pixdim"][1:4]]
    shape = img.shape[:3]
    for i, (n, z) in enumerate(zip(shape, zooms)):
        if not (np.isfinite(z) and 0 < z <= MAX_VOXEL_MM):
            why = "not a number" if not np.isfinite(z) else "not positive" if z <= 0 else f"above {MAX_VOXEL_MM:g} mm"
            raise ImageReadError(
                f"{path}: header field pixdim[{i + 1}] (voxel size along axis {i}, {n} voxels) is {z:g}: {why}; "
                "napari-dmoe does not guess the geometry, fix the header (e.g. nibabel's header.set_zooms)")
    sform, qform = int(header["sform_code"]), int(header["qform_code"])
    field = "sform (srow_x/y/z)" if sform > 0 else "qform (quatern_*, qoffset_*)" if qform > 0 else "pixdim"
    try:
        affine = np.asarray(header.get_best_affine(), dtype=np.float64)
    except Exception:  # a quaternion nibabel cannot turn into a rotation
        affine = np.full((4, 4), np.nan)
    if not np.all(np.isfinite(affine)):
        raise ImageReadError(f"{path}: header field {field} holds NaN or infinite values, so the image has no "
                             "position in space; fix or rewrite the header")
    columns = np.linalg.norm(affine[:3, :3], axis=0)
    det = abs(float(np.linalg.det(affine[:3, :3])))
    if columns.min() <= 1e-6 or det <= 1e-6 * float(np.prod(columns)):
        raise ImageReadError(f"{path}: header field {field} gives a singular affine (voxel axes of zero length or "
                             "parallel), so voxels have no defined size or orientation; fix or rewrite the header")
    bad = [f"{c:g}" for c, n in zip(columns, shape) if c > MAX_VOXEL_MM]
    if bad:
        raise ImageReadError(f"{path}: header field {field} gives voxel sizes of {', '.join(bad)} mm (above "
                             f"{MAX_VOXEL_MM:g} mm); fix the header")


def _check_nifti_size(path: Path, img: Any) -> None:
    """The voxel count the header claims must be within the limit and fit the file: nibabel allocates the whole
    array before reading it, so a forged dim[] would otherwise ask for any amount of memory."""
    from napari_dmoe.limits import check_grid

    check_grid(img.shape, f"{path}: header field dim", ImageReadError)
    header = img.header
    needed = int(np.prod(img.shape)) * header.get_data_dtype().itemsize + int(header.get_data_offset())
    if suffix_of(path) == ".nii.gz":
        with open(path, "rb") as f:  # a gzip member ends with its uncompressed size mod 2**32
            f.seek(max(0, os.path.getsize(path) - 4))
            have = int.from_bytes(f.read(4), "little")
        if needed >= 2**32:  # the trailer cannot tell: bound by the best compression deflate can reach
            have = os.path.getsize(path) * 1032
    else:
        have = os.path.getsize(path)
    if needed > have:
        raise ImageReadError(f"{path}: header field dim says {tuple(img.shape)} voxels ({needed} bytes) but the file "
                             f"holds {have} bytes; the file is truncated or its header is wrong")


# -- NIfTI -----------------------------------------------------------------------------------------------
def _read_nifti(path: Path) -> Volume:
    import nibabel as nib
    from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

    try:
        img = nib.load(str(path))
    except Exception as err:  # nibabel raises many types (ImageFileError, EOFError, zlib.error, ...)
        raise ImageReadError(f"{path}: not a readable NIfTI file ({err}); the file may be corrupt or truncated") from err
    if len(img.shape) not in (2, 3) and not (len(img.shape) == 4 and img.shape[3] == 1):
        raise ImageReadError(
            f"{path}: NIfTI image has shape {tuple(img.shape)}; napari-dmoe reads 2D or 3D images only, "
            f"extract one volume first (e.g. `fslroi` or nibabel's `img.slicer[..., 0]`)"
        )
    check_nifti_geometry(path, img)  # before the voxels are read: a bad header costs nothing
    _check_nifti_size(path, img)
    try:
        data = np.asanyarray(img.dataobj)  # applies scl_slope / scl_inter, keeps integer dtypes otherwise
    except Exception as err:  # nibabel raises many types (ImageFileError, EOFError, zlib.error, ...)
        raise ImageReadError(f"{path}: not a readable NIfTI file ({err}); the file may be corrupt or truncated") from err
    source_shape = tuple(int(s) for s in data.shape)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim != 3:
        raise ImageReadError(
            f"{path}: NIfTI image has shape {source_shape}; napari-dmoe reads 2D or 3D images only, "
            f"extract one volume first (e.g. `fslroi` or nibabel's `img.slicer[..., 0]`)"
        )
    if not data.dtype.isnative:  # big-endian files: torch and napari want native byte order
        data = data.astype(data.dtype.newbyteorder("="))
    affine = np.asarray(img.affine, dtype=np.float64)
    # Like nibabel.as_closest_canonical but to LPS+ (DICOM's patient frame), done by hand so the orientation
    # is kept for the inverse. LPS puts anterior at the top and the patient's right on the left of napari's
    # axial view: the radiological convention clinicians read in.
    source_ornt = io_orientation(affine)
    ornt = ornt_transform(source_ornt, axcodes2ornt(CANONICAL))
    canonical = np.ascontiguousarray(apply_orientation(data, ornt).transpose(2, 1, 0))
    affine_can = affine @ inv_ornt_aff(ornt, data.shape)
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=float)
    zooms = np.concatenate([zooms, np.ones(3 - len(zooms))])
    zooms_can = np.empty(3)
    zooms_can[ornt[:, 0].astype(int)] = zooms  # canonical axis ornt[i, 0] comes from file axis i
    zyx_affine = affine_can.copy()
    zyx_affine[:3, :3] = affine_can[:3, [2, 1, 0]]
    warnings = []
    if not np.allclose(affine_can[:3, :3], np.diag(np.diag(affine_can[:3, :3])), atol=1e-3):
        warnings.append("oblique volume: napari shows it axis-aligned (scale and translate only)")
    meta = {
        "source": str(path),
        "format": "nifti",
        "modality": "unknown",
        "orientation": CANONICAL,
        "source_orientation": "".join(nib.aff2axcodes(affine)),
        "nifti_affine": affine.tolist(),
        "nifti_shape": list(source_shape),
        "nifti_ornt": source_ornt.tolist(),
        "spacing_known": True,
        "warnings": warnings,
    }
    return Volume(
        array=canonical,
        spacing=tuple(float(z) for z in zooms_can[::-1]),
        # origin in LPS mm (like DICOM's), so translate + index * scale is the world position along each axis
        origin=tuple(float(o) for o in (affine_can[:3, 3] * [-1, -1, 1])[::-1]),
        affine=zyx_affine,
        meta=meta,
    )


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
        array = np.asarray(iio.imread(path))
    except Exception as err:  # imageio's plugins raise their own types
        raise ImageReadError(f"{path}: not a readable image ({err}); the file may be corrupt") from err
    warnings: list[str] = []
    array, rgb = _colour_axes(path, array, warnings)
    return _finish_plain(path, array, rgb, suffix_of(path).lstrip("."), warnings)


def _read_tiff(path: Path) -> Volume:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            array, axes = series.asarray(), series.axes
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
                 class_names: Sequence[str] = (), algorithm: Any = None) -> Path:
    """Write a label map as NIfTI (.nii/.nii.gz) in the geometry of `like`, as PNG/TIFF, or as DICOM SEG (.dcm).

    `labels` is in the napari order of `like.array` (same spatial shape). For a NIfTI source the file
    gets the source's affine and voxel order back exactly. DICOM SEG needs `like` read from DICOM (it references
    the source images); `class_names` name its segments and `algorithm` (`dicom_seg.SegAlgorithm`) says what
    made them. Other formats ignore both.
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

        return write_seg_nrrd(path, labels, like, class_names=class_names)
    if suffix == ".dcm":
        from napari_dmoe.io.dicom_seg import require_dicom_source, write_dicom_seg

        require_dicom_source(like, path)
        return write_dicom_seg(path, labels, like, class_names=class_names, algorithm=algorithm)
    from napari_dmoe.io.files import atomic_write  # a killed batch never leaves a half mask under its name

    if suffix in NIFTI_SUFFIXES:
        atomic_write(path, lambda tmp: _write_nifti(tmp, labels, like, gz=suffix == ".nii.gz"))
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
    return path


def layer_spacing(scale: Any, metadata: Any) -> tuple[float, ...] | None:
    """The voxel size (mm) a napari layer's ``scale`` stands for, or None when it is not known to be one.

    Our reader records ``spacing_known`` in the layer metadata. A layer from elsewhere (a TIFF stack, an array)
    with unit scale has no known voxel size: resampling it to a model's spacing would be a guess."""
    if scale is None:
        return None
    scale = tuple(float(s) for s in scale)
    known = (metadata or {}).get("spacing_known")
    if known is None:
        known = any(s != 1.0 for s in scale)
    return scale if known else None


def write_volume(path: str | os.PathLike, array: np.ndarray, spacing: Sequence[float],
                 origin: Sequence[float] | None = None) -> Path:
    """A (z, y, x) array (any dtype) as NIfTI with voxel size ``spacing`` and LPS ``origin`` (z, y, x), written so
    that ``read_image`` gives back the same array, spacing and origin."""
    path = Path(path)
    like = Volume(array=array, spacing=tuple(spacing), origin=tuple(origin or (0.0,) * len(spacing)), affine=None,
                  meta={})
    from napari_dmoe.io.files import atomic_write

    atomic_write(path, lambda tmp: _write_nifti(tmp, np.asarray(array), like, gz=suffix_of(path) == ".nii.gz"))
    return path


def _pad3(values: Any, fill: float) -> tuple[float, float, float]:
    """(z, y, x) from 2 or 3 values: a 2D image is one slice."""
    values = tuple(float(v) for v in values)
    return ((fill,) * (3 - len(values)) + values)[-3:]  # type: ignore[return-value]


def _write_nifti(path: Path, labels: np.ndarray, like: Volume | None, gz: bool) -> None:
    import nibabel as nib
    from nibabel.orientations import apply_orientation, axcodes2ornt, ornt_transform

    meta = like.meta if like is not None else {}
    if labels.ndim == 2:
        labels = labels[None]  # one slice: NIfTI is at least 3D in our (z, y, x) view
    if labels.ndim != 3:
        raise ImageWriteError(f"NIfTI labels must be 2D or 3D, got shape {labels.shape}")
    xyz = labels.transpose(2, 1, 0)
    if "nifti_affine" in meta:
        # Exact inverse of the reading: canonical LPS -> the file's own voxel order, then the file's affine.
        source_ornt = np.asarray(meta["nifti_ornt"])
        back = ornt_transform(axcodes2ornt(CANONICAL), source_ornt)
        data = apply_orientation(xyz, back)
        source_shape = tuple(meta["nifti_shape"])
        if data.shape != (source_shape + (1,))[:3]:
            raise ImageWriteError(
                f"labels of shape {labels.shape} do not fit the source image {meta.get('source', '')} "
                f"of shape {source_shape}; write labels made on that image"
            )
        data = data.reshape(source_shape)  # 2D or (x, y, z, 1) sources too
        affine = np.asarray(meta["nifti_affine"])
    else:
        if like is not None and like.affine is not None:
            zyx = np.asarray(like.affine, dtype=float)
            affine = zyx.copy()
            affine[:3, :3] = zyx[:3, [2, 1, 0]]
        else:  # no geometry from a file: the array is in our LPS voxel order, spacing/origin (z, y, x), origin LPS
            spacing = like.spacing if like is not None else (1.0,) * labels.ndim
            origin = like.origin if like is not None else (0.0,) * labels.ndim
            (sz, sy, sx), (oz, oy, ox) = _pad3(spacing, 1.0), _pad3(origin, 0.0)
            # x and y grow towards L and P, i.e. against RAS+: reading the file back gives the same array
            affine = np.diag([-sx, -sy, sz, 1.0])
            affine[:3, 3] = (-ox, -oy, oz)
        data = xyz
    img = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    data = img.to_bytes()  # the bytes, not nib.save: the temporary name has no .nii.gz for nibabel to go by
    if gz:
        import gzip

        data = gzip.compress(data, compresslevel=1, mtime=0)  # nibabel's own level: fast
    path.write_bytes(data)
