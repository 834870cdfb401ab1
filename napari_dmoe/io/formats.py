"""The one table of file formats: what each suffix is, who reads it, what it can hold as a label map, and the
default format a mask is saved in. The image reader and writer (``images.py``), the napari reader, writer and
save dialog, ``napari.yaml`` (checked by a test) and the CLI all ask this table.

No imports of the format modules here: they import the table, not the other way round.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class FileFormat:
    """One file format.

    Args:
        name: what a person calls it (also the save dialog's filter name).
        suffixes: lower-case suffixes; the first is the one written by default.
        napari_reads: our napari reader claims it (PNG/JPG/TIFF are left to napari's built-in readers).
        label_dims: spatial dimensions of label maps it can be written with (empty: we never write it).
        needs_dicom_source: written only for an image read from DICOM (DICOM SEG refers to its source series).
    """

    name: str
    suffixes: tuple[str, ...]
    napari_reads: bool = False
    label_dims: tuple[int, ...] = ()
    needs_dicom_source: bool = False


FORMATS: tuple[FileFormat, ...] = (
    FileFormat("NIfTI", (".nii.gz", ".nii"), napari_reads=True, label_dims=(2, 3)),
    FileFormat("DICOM", (".dcm", ".dicom", ".ima"), napari_reads=True, label_dims=(2, 3), needs_dicom_source=True),
    FileFormat("3D Slicer segmentation", (".seg.nrrd",), napari_reads=True, label_dims=(2, 3)),
    FileFormat("PNG", (".png",), label_dims=(2,)),
    FileFormat("TIFF", (".tif", ".tiff"), label_dims=(2, 3)),
    FileFormat("JPEG", (".jpg", ".jpeg")),  # lossy: read, never written as labels
)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
TIFF_SUFFIXES = (".tif", ".tiff")
PLAIN_SUFFIXES = (".png", ".jpg", ".jpeg", *TIFF_SUFFIXES)  # read by imageio/tifffile


def suffix_of(path: str | Path) -> str:
    """Lower-case suffix, with `.nii.gz` kept whole."""
    name = Path(path).name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return Path(name).suffix


def format_of(path: str | Path) -> FileFormat | None:
    """The table's entry for ``path``'s suffix (``.seg.nrrd`` before ``.nrrd``), or None."""
    name = Path(path).name.lower()
    return next((f for f in FORMATS for s in f.suffixes if name.endswith(s)), None)


def reader_patterns() -> list[str]:
    """``napari.yaml``'s reader ``filename_patterns``."""
    return [f"*{s}" for f in FORMATS if f.napari_reads for s in f.suffixes if s != ".dicom" and s != ".ima"]


def writer_extensions() -> list[str]:
    """``napari.yaml``'s writer ``filename_extensions``: every suffix we write labels as."""
    return [s for f in FORMATS if f.label_dims for s in f.suffixes if s not in (".dicom", ".ima")]


def default_mask_suffix(source_format: str | None, spatial_dims: int, dicom_files: bool = False) -> str:
    """The one rule for the format of a mask saved without a suffix: DICOM SEG beside a DICOM series when the
    caller can write it (``dicom_files``: the source's files are known), NIfTI for NIfTI, DICOM and every other
    volume (keeps the geometry), PNG for a 2D image from a plain file."""
    if source_format == "dicom" and dicom_files:
        return ".dcm"
    if source_format in ("nifti", "dicom") or spatial_dims == 3:
        return ".nii.gz"
    return ".png"


def dialog_filters(first: str) -> str:
    """Qt save-dialog filters, the format of ``first`` (a suffix) first: "NIfTI (*.nii.gz *.nii);;PNG (*.png)"."""
    writable = [f for f in FORMATS if f.label_dims]
    writable.sort(key=lambda f: first not in f.suffixes)
    return ";;".join(f"{'DICOM SEG' if f.needs_dicom_source else f.name} ({' '.join('*' + s for s in f.suffixes)})"
                     for f in writable)
