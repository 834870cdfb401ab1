"""Save a result mask the way a clinician expects, without knowing napari's writer menu: DICOM SEG next to a
DICOM series, NIfTI in the source geometry next to a NIfTI file, PNG for a 2D image, NIfTI for other volumes.

Qt only in ``save_dialog`` (the file dialog); the rest picks the default and writes through the same code as
napari's File > Save (``napari_dmoe.plugin.writer``), so both give the same file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from napari_dmoe.plugin.widgets.results import RESULT_KEY

FILTERS = {".dcm": "DICOM SEG (*.dcm)", ".nii.gz": "NIfTI (*.nii.gz *.nii)", ".png": "PNG (*.png)",
           ".tif": "TIFF (*.tif *.tiff)"}


def is_mask(layer: Any) -> bool:
    meta = getattr(layer, "metadata", {}) or {}
    return isinstance(meta.get(RESULT_KEY), dict) and meta[RESULT_KEY].get("kind") == "mask"


def default_suffix(layer: Any) -> str:
    """The format the source image came in, as far as a mask can carry it."""
    meta = layer.metadata or {}
    if meta.get("format") == "dicom" and meta.get("files"):
        return ".dcm"
    if meta.get("format") == "nifti" or layer.data.ndim == 3:
        return ".nii.gz"
    return ".png"


def default_path(layer: Any) -> Path:
    """``<source folder>/<source name>_mask<suffix>``, or the working folder when the source is not a file."""
    meta = layer.metadata or {}
    source = Path(str(meta.get("source") or ""))
    prov = meta.get(RESULT_KEY) or {}
    stem = str(prov.get("source_layer") or layer.name).replace("/", "_").replace(" ", "_")
    folder = (source if source.is_dir() else source.parent) if str(source) not in ("", ".") else Path.cwd()
    if meta.get("format") == "dicom" and source.is_dir():
        folder = source.parent  # next to the series folder, not inside it (a PACS import would pick it up)
    return folder / f"{stem}_mask{default_suffix(layer)}"


def save(layer: Any, path: str | Path) -> Path:
    """Write the mask layer to ``path`` (format from its suffix) with napari's writer of this plugin."""
    from napari_dmoe.plugin.writer import write_labels_layer

    attributes = {"metadata": layer.metadata, "scale": tuple(layer.scale), "translate": tuple(layer.translate)}
    [written] = write_labels_layer(str(path), layer.data, attributes)
    return Path(written)


def save_dialog(parent: Any, viewer: Any, path: str | Path | None = None) -> Path | None:
    """Save the selected result mask (else the newest one) to ``path``, asked with a dialog when None, in the
    source's own format by default; returns the path written, or None when cancelled or refused (with a message)."""
    from napari.utils.notifications import show_error, show_info

    selected = viewer.layers.selection.active
    masks = [layer for layer in viewer.layers if is_mask(layer)]
    layer = selected if selected is not None and is_mask(selected) else (masks[-1] if masks else None)
    if layer is None:
        show_error("No mask to save: segment an image first")
        return None
    if path is None:
        from qtpy.QtWidgets import QFileDialog

        filters = ";;".join([FILTERS[default_suffix(layer)], *(f for s, f in FILTERS.items() if s != default_suffix(layer))])
        path, _ = QFileDialog.getSaveFileName(parent, f"Save {layer.name}", str(default_path(layer)), filters)
        if not path:
            return None
    try:
        written = save(layer, path)
    except (ValueError, OSError) as err:  # ImageWriteError is a ValueError: bad format for this source
        show_error(f"Mask not saved: {err}")
        return None
    show_info(f"Saved '{layer.name}' to {written}")
    return written
