"""npe2 writer: a labels layer -> NIfTI (.nii/.nii.gz, in the source image's geometry), 2D PNG/TIFF, or DICOM SEG.

Geometry comes from the layer metadata our reader stored (copy the image layer's metadata onto labels you
make from it); without it, from the layer's scale and translate. DICOM SEG (.dcm) needs that metadata from a
DICOM source (it lists the source files); a mask made by the segment widget also names its classes and model,
and every format saves how it was made (``mask_provenance``: model, attribute, forced, fit findings; see
``io/provenance.py``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def write_labels_layer(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    from napari_dmoe.io.images import Volume, write_labels

    labels = np.asarray(data)
    meta = dict(attributes.get("metadata") or {})
    ndim = labels.ndim
    if "nifti_affine" in meta or meta.get("affine") is not None:
        spacing = tuple(meta.get("spacing") or (1.0,) * ndim)
        origin = tuple(meta.get("origin") or (0.0,) * ndim)
        affine = np.asarray(meta["affine"]) if meta.get("affine") is not None else None
    else:
        spacing = tuple(float(s) for s in attributes.get("scale", (1.0,) * ndim))
        origin = tuple(float(t) for t in attributes.get("translate", (0.0,) * ndim))
        affine = None
    like = Volume(array=np.broadcast_to(np.zeros((), labels.dtype), labels.shape), spacing=spacing[-ndim:],
                  origin=origin[-ndim:], affine=affine, meta=meta)
    if path.lower().endswith(".seg.nrrd"):  # 3D Slicer: named, coloured segments
        from napari_dmoe.io.slicer_seg import write_seg_nrrd

        names, colors = _segments(meta, attributes, labels)
        return [str(write_seg_nrrd(path, labels, like, class_names=names, colors=colors,
                                   provenance=mask_provenance(meta, labels)))]
    class_names, algorithm = _seg_info(meta, labels) if path.lower().endswith(".dcm") else ((), None)
    return [str(write_labels(path, labels, like=like, class_names=class_names, algorithm=algorithm,
                             provenance=mask_provenance(meta, labels)))]


def mask_provenance(meta: dict[str, Any], labels: np.ndarray) -> dict[str, Any] | None:
    """How a mask from the Segment widget was made (its layer metadata, ``results.provenance``), as saved with it:
    model, attribute, whether the user segmented an image that does not fit the model anyway, the fit findings,
    device, notes, and whether the user edited the mask since. None for labels we did not make."""
    from napari_dmoe.io.provenance import mask_record
    from napari_dmoe.plugin.results import is_edited

    prov = meta.get("dmoe") if isinstance(meta.get("dmoe"), dict) else {}
    if prov.get("kind") != "mask":
        return None
    return mask_record(prov.get("model", ""), prov.get("attribute_used") or {}, forced=prov.get("forced", False),
                       fit_findings=prov.get("fit_findings") or (), device=prov.get("device", ""),
                       warnings=prov.get("warnings") or (), conversions=prov.get("conversions") or (),
                       settings=prov.get("settings"), source=prov.get("source_layer", ""),
                       edited=is_edited(meta, labels))


def _seg_info(meta: dict[str, Any], labels: np.ndarray) -> tuple[list[str], Any]:
    """Class names and algorithm for DICOM SEG from the provenance the segment widget stores on a mask.

    The SEG says how the mask came to be: the model's mask as it was made (AUTOMATIC), a model mask the user
    edited since (SEMIAUTOMATIC: its data no longer match the digest stored at creation), or labels a person drew
    (MANUAL)."""
    from napari_dmoe.plugin.results import is_edited
    from napari_dmoe.io.dicom_seg import SegAlgorithm
    from napari_dmoe.model.spec import attribute_text

    prov = meta.get("dmoe") if isinstance(meta.get("dmoe"), dict) else {}
    if prov.get("kind") != "mask":  # hand-drawn labels (or expert maps): no class names or model to give
        return [], SegAlgorithm(kind="manual")
    used = prov.get("attribute_used")
    attribute = attribute_text(used) if used else ""
    model = Path(str(prov.get("model") or "")).name
    kind = "semiautomatic" if is_edited(meta, labels) else "automatic"
    return (list((prov.get("spec") or {}).get("class_names") or []),
            SegAlgorithm(model=model, attribute=attribute, kind=kind, forced=bool(prov.get("forced")),
                         findings=tuple(prov.get("fit_findings") or ())))


def _segments(meta: dict[str, Any], attributes: dict[str, Any], labels: np.ndarray) -> tuple[list[str], list[Any]]:
    """Segment names and colours for label values 1..n: those read from a .seg.nrrd, else the model's class names
    (a mask from the segment widget) or a DICOM SEG's, coloured as napari shows the layer."""
    read = meta.get("segments") if isinstance(meta.get("segments"), list) else []
    if read:
        n = max(int(s["value"]) for s in read)
        by_value = {int(s["value"]): s for s in read}
        names = ["background"] + [str(by_value.get(k, {}).get("name", "")) for k in range(1, n + 1)]
        colors = [by_value[k]["color"] if k in by_value else None for k in range(1, n + 1)]
        if all(c is not None for c in colors):
            return names, colors
        return names, _layer_colors(attributes, n)
    prov = meta.get("dmoe") if isinstance(meta.get("dmoe"), dict) else {}
    names = list((prov.get("spec") or {}).get("class_names") or meta.get("class_names") or [])
    n = max(len(names) - 1, int(labels.max()) if labels.size else 0)
    return names, _layer_colors(attributes, n)


def _layer_colors(attributes: dict[str, Any], n: int) -> list[Any] | None:
    """The layer's own colours of labels 1..n (napari's colormap), or None for the default palette."""
    cmap = attributes.get("colormap")
    try:
        rgba = np.asarray(cmap.map(np.arange(1, n + 1)), dtype=float)
    except (AttributeError, TypeError, ValueError):
        return None
    return [tuple(c[:3]) for c in rgba] if rgba.shape == (n, 4) else None
