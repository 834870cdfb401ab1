"""Save a result mask the way a clinician expects, without knowing napari's writer menu: DICOM SEG next to a
DICOM series, NIfTI in the source geometry next to a NIfTI file, PNG for a 2D image, NIfTI for other volumes.

Qt only in ``save_dialog`` (the file dialog); the rest picks the default and writes through the same code as
napari's File > Save (``napari_dmoe.plugin.writer``), so both give the same file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from napari_dmoe.plugin.results import RESULT_KEY

def is_mask(layer: Any) -> bool:
    meta = getattr(layer, "metadata", {}) or {}
    return isinstance(meta.get(RESULT_KEY), dict) and meta[RESULT_KEY].get("kind") == "mask"


def default_suffix(layer: Any) -> str:
    """The format the source image came in, as far as a mask can carry it (the rule of ``io.formats``)."""
    from napari_dmoe.io.formats import default_mask_suffix

    meta = layer.metadata or {}
    return default_mask_suffix(meta.get("format"), layer.data.ndim, dicom_files=bool(meta.get("files")))


def _safe(text: str) -> str:
    """A file-name part: letters, digits, '-', '.', '+'; everything else (spaces, '/', ',', '=') becomes '_' or '-'."""
    text = str(text).replace("=", "-").replace(", ", "_")
    return "".join(c if c.isalnum() or c in "-.+_" else "_" for c in text).strip("._") or "mask"


def default_path(layer: Any) -> Path:
    """``<source folder>/<source name>_mask_<attribute>-<value>_<model><suffix>`` (the working folder when the source
    is not a file): a mask saved after a sweep, or beside another model's, says in its name what it is."""
    meta = layer.metadata or {}
    source = Path(str(meta.get("source") or ""))
    prov = meta.get(RESULT_KEY) or {}
    parts = [str(prov.get("source_layer") or layer.name), "mask"]
    used = prov.get("attribute_used")
    if isinstance(used, dict) and used:
        from napari_dmoe.model.spec import attribute_text

        parts.append(attribute_text(used))
    if prov.get("model_name"):
        parts.append(str(prov["model_name"]))
    folder = (source if source.is_dir() else source.parent) if str(source) not in ("", ".") else Path.cwd()
    if meta.get("format") == "dicom" and source.is_dir():
        folder = source.parent  # next to the series folder, not inside it (a PACS import would pick it up)
    return folder / ("_".join(_safe(p) for p in parts) + default_suffix(layer))


def shown_masks(viewer: Any, source: str | None, tag: str | None, model: str | None) -> list[Any]:
    """The masks of image ``source`` made by ``model`` (a path) under attribute ``tag``: what the Segment widget
    shows (its image, model and attribute), so a sweep's other masks are never saved by mistake. Several when the
    user kept an edited copy beside a re-run."""
    return [layer for layer in viewer.layers if is_mask(layer) and (
        layer.metadata[RESULT_KEY].get("source_layer"), layer.metadata[RESULT_KEY].get("tag"),
        layer.metadata[RESULT_KEY].get("model")) == (source, tag, model)]


def save(layer: Any, path: str | Path) -> Path:
    """Write the mask layer to ``path`` (format from its suffix) with napari's writer of this plugin."""
    from napari_dmoe.plugin.writer import write_labels_layer

    attributes = {"metadata": layer.metadata, "scale": tuple(layer.scale), "translate": tuple(layer.translate)}
    [written] = write_labels_layer(str(path), layer.data, attributes)
    return Path(written)


def ask_which(parent: Any, names: list[str], why: str) -> str | None:
    """Let the user pick one mask layer by name (None when cancelled)."""
    from qtpy.QtWidgets import QInputDialog

    name, ok = QInputDialog.getItem(parent, "Save which mask?", why, names, 0, False)
    return name if ok else None


def pick_mask(parent: Any, viewer: Any, shown: tuple[str | None, str | None, str | None] | None,
              ask: Any = ask_which) -> Any:
    """The mask to save: the one of the image, attribute and model the widget shows (``shown``); when there is
    not exactly one, ``ask`` the user among the candidates (or every mask). None when there is none or the user
    cancels."""
    masks = [layer for layer in viewer.layers if is_mask(layer)]
    if shown is None:  # no widget state to go by: the selected mask, else the newest
        selected = viewer.layers.selection.active
        return selected if selected is not None and is_mask(selected) else (masks[-1] if masks else None)
    found = shown_masks(viewer, *shown)
    if len(found) == 1:
        return found[0]
    if not masks:
        return None
    source, tag, model = shown
    why = (f"Several masks of '{source}' under {tag}: which one?" if found else
           f"No mask of '{source}' under {tag} with this model yet: save which one?")
    choices = found or masks
    name = ask(parent, [layer.name for layer in choices], why)
    return next((layer for layer in choices if layer.name == name), None)


def save_dialog(parent: Any, viewer: Any, path: str | Path | None = None,
                shown: tuple[str | None, str | None, str | None] | None = None, ask: Any = ask_which) -> Path | None:
    """Save the mask the widget shows (``shown`` = image name, attribute tag, model path; see ``pick_mask``) to
    ``path``, asked with a dialog when None, in the source's own format by default; returns the path written, or
    None when cancelled or refused (with a message)."""
    from napari.utils.notifications import show_error, show_info

    layer = pick_mask(parent, viewer, shown, ask)
    if layer is None:
        if not any(is_mask(layer) for layer in viewer.layers):
            show_error("No mask to save: segment an image first")
        return None
    if path is None:
        from qtpy.QtWidgets import QFileDialog

        from napari_dmoe.io.formats import dialog_filters

        filters = dialog_filters(default_suffix(layer))
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
