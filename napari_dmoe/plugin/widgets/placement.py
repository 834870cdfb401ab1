"""Placing result layers in a viewer: replace the previous result of the same image, model and attribute, keep a
mask the user edited (renamed, never lost), and keep the result of another model file that has the same name (two
runs' ``best.safetensors``). No Qt; napari's viewer API only.
"""
from __future__ import annotations

from typing import Any

from napari_dmoe.plugin.results import (
    DIGEST_KEY,
    EDITABLE_TYPES,
    RESULT_KEY,
    data_digest,
    edited_name,
    is_edited,
    is_result,
)


def routing_layers(viewer: Any, source: str) -> dict[str, Any]:
    """kind -> the newest heatmaps / dominant-expert layer made from the image named ``source`` (empty when none)."""
    found: dict[str, Any] = {}
    for layer in viewer.layers:
        prov = layer.metadata.get(RESULT_KEY) if is_result(layer.metadata) else None
        if prov and prov.get("source_layer") == source and prov.get("kind") in ("experts", "dominant"):
            found[prov["kind"]] = layer
    return found


def name_sliders(viewer: Any, layer: Any) -> None:
    """Name the sliders after ``layer``'s own axis names (the image the Segment widget works on): a 3D image and a
    2D result's expert stack share the first slider, which napari names after the newest of the two."""
    labels = tuple(str(a) for a in layer.axis_labels)
    if all(a.lstrip("-").isdigit() for a in labels) or len(labels) > viewer.dims.ndim:
        return  # napari's default names: nothing to say
    names = list(viewer.dims.axis_labels)
    names[len(names) - len(labels):] = labels
    viewer.dims.axis_labels = tuple(names)


def replace_layers(viewer: Any, layers: list) -> list[tuple[str, str]]:
    """Add result layers; a result layer of the same name (same image, model name and attribute) is replaced,
    unless the user edited its data since we made it (renamed "<name> (edited)" and kept) or another model file
    of the same name made it (renamed "<name> (other file)" and kept).

    Returns (old name, new name) of every edited layer kept. Editable layers get a digest of their data once
    added (what napari holds, so a dtype conversion on adding can never look like an edit).
    """
    kept = []
    for data, kwargs, kind in reversed(layers):  # the mask ends up on top
        name = kwargs["name"]
        if name in viewer.layers and is_result(viewer.layers[name].metadata):
            old = viewer.layers[name]
            if is_edited(old.metadata, old.data):
                old.name = edited_name(name, viewer.layers)
                old.metadata[RESULT_KEY]["edited"] = True
                kept.append((name, old.name))
            elif old.metadata[RESULT_KEY].get("model") != kwargs["metadata"][RESULT_KEY].get("model"):
                old.name = edited_name(name, viewer.layers, "other file")  # same stem, another file: not ours
            else:
                viewer.layers.remove(old)
        layer = getattr(viewer, f"add_{kind}")(data, **kwargs)
        if kind in EDITABLE_TYPES:
            layer.metadata[RESULT_KEY][DIGEST_KEY] = data_digest(layer.data)
    return kept
