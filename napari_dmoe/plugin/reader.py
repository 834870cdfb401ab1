"""npe2 reader: NIfTI files, DICOM files and DICOM series folders -> napari layers with physical scale.

PNG/JPG/TIFF are left to napari's built-in readers. The affine is not passed to napari (scale and translate
only, see napari-nninteractive#10); the full source geometry rides along in the layer metadata so the
writer can put labels back exactly where the image came from.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

LABEL_HINTS = ("label", "seg", "mask")


def napari_get_reader(path: str | list[str]) -> Callable[[Any], list[tuple]] | None:
    """Return a reader for a NIfTI/DICOM file or a folder holding DICOM files, else None."""
    if isinstance(path, (list, tuple)):
        names = [os.fspath(p).lower() for p in path]
        if len(names) > 1:  # several files: only slices of a DICOM series are ours
            return read_layers if all(n.endswith(".dcm") for n in names) else None  # (DICOM files only)
        path = path[0]
    path = os.fspath(path)
    if os.path.isdir(path):
        from napari_dmoe.io.dicom import folder_has_dicom

        return read_layers if folder_has_dicom(path) else None  # let other readers try other folders
    from napari_dmoe.io.formats import format_of

    fmt = format_of(path)
    return read_layers if fmt is not None and fmt.napari_reads else None


def layer_metadata(volume: Any) -> dict[str, Any]:
    """Everything the writer needs to restore the source geometry, plus what a user wants to see."""
    meta = dict(volume.meta)
    meta.update(spacing=list(volume.spacing), origin=list(volume.origin),
                affine=volume.affine.tolist() if volume.affine is not None else None)
    return meta


def read_layers(path: str | list[str]) -> list[tuple]:
    from napari_dmoe.io.images import read_image

    if isinstance(path, (list, tuple)) and len(path) > 1:
        from napari_dmoe.io.dicom import read_dicom_series

        volume = read_dicom_series(list(path))
        path = os.path.dirname(os.fspath(path[0]))  # the series is named after its folder
    else:
        path = path[0] if isinstance(path, (list, tuple)) else path
        segmentation = _read_segmentation(os.fspath(path))
        if segmentation is not None:
            return [segmentation]
        volume = read_image(path)
    data = volume.array
    stem = Path(path).name.lower()
    is_labels = data.dtype.kind in "iu" and any(h in stem for h in LABEL_HINTS) and not volume.rgb
    kwargs: dict[str, Any] = {
        "name": Path(path).name.split(".")[0] or Path(path).name,
        "scale": tuple(volume.spacing),
        "translate": tuple(volume.origin),
        "metadata": layer_metadata(volume),
    }
    if data.ndim - int(volume.rgb) == 3:  # a named slider: beside a 2D result's expert stack it still says "z"
        kwargs["axis_labels"] = ("z", "y", "x")
    if is_labels:
        return [(data, kwargs, "labels")]
    kwargs["rgb"] = volume.rgb
    if not volume.rgb:
        kwargs["colormap"] = "gray"
    return [(data, kwargs, "image")]


def _read_segmentation(path: str) -> tuple | None:
    """A 3D Slicer .seg.nrrd or a DICOM SEG as a labels layer (segment names and colours kept), else None."""
    lower = path.lower()
    if lower.endswith(".seg.nrrd"):
        from napari_dmoe.io.slicer_seg import read_seg_nrrd

        volume = read_seg_nrrd(path)
    elif lower.endswith(".dcm") and os.path.isfile(path):
        from napari_dmoe.io.dicom_seg import is_dicom_seg, read_dicom_seg

        if not is_dicom_seg(path):
            return None
        volume = read_dicom_seg(path)
    else:
        return None
    kwargs: dict[str, Any] = {"name": Path(path).name.split(".")[0] or Path(path).name,
                              "scale": tuple(volume.spacing), "translate": tuple(volume.origin),
                              "metadata": layer_metadata(volume)}
    if volume.array.ndim == 3:
        kwargs["axis_labels"] = ("z", "y", "x")
    segments = volume.meta.get("segments") or []
    if segments:  # Slicer's colours, so the mask looks in napari as it did in Slicer
        colors = {None: (0.0, 0.0, 0.0, 0.0), 0: (0.0, 0.0, 0.0, 0.0)}
        colors.update({int(s["value"]): (*s["color"][:3], 1.0) for s in segments})
        from napari.utils.colormaps import DirectLabelColormap

        kwargs["colormap"] = DirectLabelColormap(color_dict=colors)
    return (volume.array, kwargs, "labels")
