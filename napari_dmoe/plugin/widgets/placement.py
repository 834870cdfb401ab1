"""Placing result layers in a viewer: replace the previous result of the same image and attribute, keep a mask
the user edited (renamed, never lost), and name the heatmaps' expert axis. No Qt; napari's viewer API only.
"""
from __future__ import annotations

from typing import Any

from napari_dmoe.plugin.widgets.results import (
    DIGEST_KEY,
    EDITABLE_TYPES,
    RESULT_KEY,
    data_digest,
    edited_name,
    is_edited,
    is_result,
)


def replace_layers(viewer: Any, layers: list) -> list[tuple[str, str]]:
    """Add result layers; a result layer of the same name (same image and attribute) is replaced, unless the
    user edited its data since we made it: that one is renamed "<name> (edited)" and kept.

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
            else:
                viewer.layers.remove(old)
        layer = getattr(viewer, f"add_{kind}")(data, **kwargs)
        if kind in EDITABLE_TYPES:
            layer.metadata[RESULT_KEY][DIGEST_KEY] = data_digest(layer.data)
    return kept
