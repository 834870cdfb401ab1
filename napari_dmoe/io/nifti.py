"""NIfTI in and out, with the geometry kept exactly: volumes are reoriented to LPS+ voxel order on reading (napari's
axial view is then radiological) and the file's own affine, shape and orientation go in ``meta`` so that writing
labels undoes the reorientation bit for bit. Headers are checked before any voxel is read. Reached through
``images.read_image`` / ``images.write_labels``; nibabel is imported inside the functions.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from napari_dmoe.io.formats import suffix_of
from napari_dmoe.io.volume import ImageReadError, ImageWriteError, Volume

CANONICAL = "LPS"  # voxel axis order (x, y, z) that NIfTI volumes are reoriented to
MAX_VOXEL_MM = 100.0  # larger voxels are a broken header, not an image (and would make huge resampled grids)


def check_nifti_geometry(path: Path, img: Any) -> list[str]:
    """Refuse zero, negative, NaN or absurd voxel sizes and a NaN or singular affine, naming the field; refuse a
    qform and an sform that disagree on the voxel size; return warnings (pixdim that the sform overrides, a qform
    placed elsewhere than the sform).

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
    return _sform_against_qform(path, header, affine, zooms) if sform > 0 else []


ZOOM_RTOL = 1e-3  # voxel sizes that differ by more than this share are different geometries, not rounding


def _mm(values: Any) -> str:
    return "x".join(f"{float(v):.4g}" for v in values)


def _sform_against_qform(path: Path, header: Any, sform: np.ndarray, pixdim: list[float]) -> list[str]:
    """Which geometry a file with an sform means. Like nibabel and ITK we use the sform (NIfTI "method 3") when its
    code is set. A qform (also set) that gives other voxel sizes is a contradiction we do not resolve by guessing:
    refused (issue 28: resampled at the wrong scale, Dice 0.22 instead of 0.68). pixdim alone (qform code 0) is the
    legacy field the sform overrides: a warning says so. A qform elsewhere in space but with the same voxel sizes
    does not change the segmentation: a warning."""
    s_zooms = np.linalg.norm(sform[:3, :3], axis=0)
    s_code, q_code = int(header["sform_code"]), int(header["qform_code"])
    if q_code > 0:
        try:
            qform = np.asarray(header.get_qform(), dtype=np.float64)
        except Exception:  # an unusable quaternion: the sform decides, as it would without a qform
            qform = None
        if qform is not None and np.all(np.isfinite(qform)):
            q_zooms = np.linalg.norm(qform[:3, :3], axis=0)
            if not np.allclose(q_zooms, s_zooms, rtol=ZOOM_RTOL, atol=1e-6):
                raise ImageReadError(
                    f"{path}: header fields sform (code {s_code}: voxel size {_mm(s_zooms)} mm) and qform (code "
                    f"{q_code}: {_mm(q_zooms)} mm, as pixdim) disagree on the voxel size; napari-dmoe does not guess "
                    "which one is meant: make them agree, or set the wrong one's code to 0 (nibabel: "
                    "img.set_qform(None) or img.set_sform(None))")
            if not np.allclose(qform, sform, atol=1e-2 * float(s_zooms.min())):
                return [f"the sform (code {s_code}) and qform (code {q_code}) place the image differently; the sform "
                        "is used, as nibabel and ITK do"]
        return []
    if not np.allclose(s_zooms, pixdim, rtol=ZOOM_RTOL, atol=1e-6):
        return [f"header field pixdim says voxel size {_mm(pixdim)} mm but the sform (code {s_code}) says "
                f"{_mm(s_zooms)} mm; the sform is used (NIfTI method 3, as nibabel and ITK do)"]
    return []


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


def read_nifti(path: Path) -> Volume:
    """A NIfTI file as a Volume in LPS+ voxel order, (z, y, x) axes, the source geometry in ``meta``."""
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
    header_notes = check_nifti_geometry(path, img)  # before the voxels are read: a bad header costs nothing
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
    # the voxel size of the affine that places the image (sform, else qform, else pixdim: nibabel's choice), never
    # pixdim beside an sform that says otherwise: spacing and orientation come from one geometry
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    zooms_can = np.empty(3)
    zooms_can[ornt[:, 0].astype(int)] = zooms  # canonical axis ornt[i, 0] comes from file axis i
    zyx_affine = affine_can.copy()
    zyx_affine[:3, :3] = affine_can[:3, [2, 1, 0]]
    warnings = list(header_notes)
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


def _pad3(values: Any, fill: float) -> tuple[float, float, float]:
    """(z, y, x) from 2 or 3 values: a 2D image is one slice."""
    values = tuple(float(v) for v in values)
    return ((fill,) * (3 - len(values)) + values)[-3:]  # type: ignore[return-value]


def write_nifti(path: Path, labels: np.ndarray, like: Volume | None, gz: bool, provenance: Any = None) -> None:
    """Labels (or any array) as NIfTI at ``path``: in the source file's exact geometry when ``like`` came from one,
    else from ``like``'s spacing/origin (LPS, z-y-x)."""
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
    if provenance:  # how the mask was made: a JSON comment extension and a short description (io/provenance.py)
        from napari_dmoe.io.provenance import NIFTI_ECODE, summary, to_json

        img.header.extensions.append(nib.nifti1.Nifti1Extension(NIFTI_ECODE, to_json(provenance).encode()))
        img.header["descrip"] = summary(provenance).encode("ascii", "replace")
    data = img.to_bytes()  # the bytes, not nib.save: the temporary name has no .nii.gz for nibabel to go by
    if gz:
        import gzip

        data = gzip.compress(data, compresslevel=1, mtime=0)  # nibabel's own level: fast
    path.write_bytes(data)
