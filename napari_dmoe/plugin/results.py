"""Turn a Segmentation into napari layer data tuples, aligned with the source layer and carrying provenance.

No Qt and no torch: plain numpy and dicts, so the layer contents are testable without a viewer.
Layer names are deterministic and lead with what the layer is, then the model and the attribute, then the image
("mask [race=Black; fundus-dmoe] <image>"), so the layers of one run are told apart in a narrow layer list, two
models' results on one image coexist, and a re-run replaces the layers of the same image, model and attribute
instead of piling up (see ``placement.replace_layers``). A result the user
edited must never be replaced: editable layers carry a digest of the data we made (``data_digest``), and a layer
whose data no longer matches it is kept under another name (``is_edited``, ``edited_name``).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from napari_dmoe.inference.sweep import expert_usage
from napari_dmoe.model.spec import attribute_text

RESULT_KEY = "dmoe"  # layer.metadata[RESULT_KEY] holds the provenance of every layer we make
KINDS = ("mask", "experts", "dominant")
DIGEST_KEY = "data_digest"  # in layer.metadata[RESULT_KEY]: digest of the data as we made it
# Layer types napari lets a user edit (paint, fill, erase). Image layers (the heatmaps) have no editing tools, and
# hashing their float16 [experts, *grid] stack would cost ~8x a mask's time on every re-run.
EDITABLE_TYPES = ("labels",)
LayerDataTuple = tuple[Any, dict[str, Any], str]


@dataclass
class SourceInfo:
    """What we need from the image layer, captured in the GUI thread at launch."""

    name: str
    scale: tuple[float, ...]
    translate: tuple[float, ...]
    metadata: dict[str, Any] = field(default_factory=dict)
    rgb: bool = False


def model_label(model_path: str) -> str:
    """How a layer name calls a model: the file's stem, or a server's model id (``<url>/models/<id>``)."""
    return Path(str(model_path).rstrip("/")).name.removesuffix(".safetensors") or str(model_path)


def layer_image(layer: Any) -> tuple[Any, tuple[float, ...] | None, bool, str | None]:
    """(data, spacing, rgb, modality) of an image layer as the fit check and the engine take them (a multiscale
    layer: its full-resolution level; spacing only where the layer's scale is a known voxel size)."""
    from napari_dmoe.inference.fit import image_modality
    from napari_dmoe.io.images import layer_spacing

    data = layer.data[0] if layer.multiscale else layer.data
    spacing = None if layer.rgb else layer_spacing(layer.scale, layer.metadata)
    return data, spacing, bool(layer.rgb), image_modality(layer.metadata)


def layer_name(source: str, kind: str, tag: str, model: str = "") -> str:
    label = {"mask": "mask", "experts": "experts", "dominant": "dominant expert"}[kind]
    # the attribute first: a narrow layer list elides the middle of a name, and the attribute is what tells a
    # sweep's masks apart
    return f"{label} [{tag}; {model}] {source}" if model else f"{label} [{tag}] {source}"


def axis_labels(n_spatial: int, expert_axis: bool = False) -> tuple[str, ...]:
    """Slider names of a result layer: ("z", "y", "x") or ("y", "x"), led by "expert" for the heatmap stack; set
    on each layer, so napari names the viewer's sliders right whatever was run before."""
    return (("expert",) if expert_axis else ()) + ("z", "y", "x")[-n_spatial:]


def expert_colormap(n_experts: int) -> Any:
    """Clearly different colours per expert for the dominant-expert map (matplotlib's tab10/tab20; napari's default
    label colours made neighbouring experts near-identical purples); 0 (no expert) stays transparent."""
    from matplotlib import colormaps
    from napari.utils.colormaps import DirectLabelColormap

    table = colormaps["tab10" if n_experts <= 10 else "tab20"]
    colors = {None: (0.0, 0.0, 0.0, 0.0), 0: (0.0, 0.0, 0.0, 0.0)}
    colors.update({e + 1: tuple(table(e % table.N)) for e in range(n_experts)})
    return DirectLabelColormap(color_dict=colors)


def heat_colormap() -> Any:
    """Gate weight 0 -> transparent, 1 -> opaque yellow through orange-red: the image shows through where an
    expert does no work, and the heatmap reads on a grey CT (an additive dark colormap washes out there)."""
    from napari.utils.colormaps import Colormap

    # faint below ~0.25 (every expert gets some weight somewhere), so the CT stays readable under the map
    colors = [[0.0, 0.0, 0.0, 0.0], [0.85, 0.1, 0.1, 0.2], [1.0, 0.5, 0.0, 0.7], [1.0, 1.0, 0.3, 0.95]]
    return Colormap(colors, controls=[0.0, 0.25, 0.6, 1.0], name="dmoe gate weight", display_name="gate weight")


def spec_summary(spec: Any) -> dict[str, Any]:
    """The parts of a ModelSpec a reader of the layer metadata wants to see (JSON-safe)."""
    return {
        "arch": spec.arch,
        "routing": spec.routing,
        "n_experts": spec.n_experts,
        "top_k": spec.top_k,
        "attributes": {a.name: list(a.values) for a in spec.attributes},
        "class_names": list(spec.class_names),
        "input_size": list(spec.input_size),
        "spacing": spec.spacing,
        "normalization": dict(spec.normalization),
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def provenance(seg: Any, spec: Any, model_path: str, source: SourceInfo, request: Mapping[str, str],
               position: str, record: Any = None) -> dict[str, Any]:
    """Everything needed to audit a result: model, attribute asked for and used, device, timings, warnings, and
    from the engine's ``record`` (``inference.request.Provenance``) whether the user segmented an image that does
    not fit the model anyway ("forced") and what the fit check found; the writer saves these with the mask."""
    from napari_dmoe import __version__

    usage = {pos: expert_usage(m) for pos, m in seg.routing.items()}
    engine = record.to_dict() if hasattr(record, "to_dict") else dict(record or {})
    return _jsonable({
        "forced": bool(engine.get("forced", False)),
        "fit_findings": list(engine.get("fit_findings") or []),
        "settings": dict(engine.get("settings") or {}),
        "source_layer": source.name,
        "model": str(model_path),
        "spec": spec_summary(spec),
        "attribute_request": dict(request),
        "attribute_used": seg.attribute,
        "device": seg.device,
        "device_reason": getattr(seg, "device_reason", ""),
        "timings": dict(seg.timings),
        "warnings": list(getattr(seg, "warnings", [])),
        "conversions": list(getattr(seg, "conversions", [])),
        "routing_position": position,
        "expert_usage": usage,
        "napari_dmoe_version": __version__,
    })


def _routing_for(seg: Any, position: str, notes: list[str]) -> tuple[str, np.ndarray | None, np.ndarray | None]:
    """The heatmap stack and dominant-expert map for ``position`` (falls back to "mean" with a note)."""
    if not seg.routing:
        return position, None, None
    if position not in seg.routing:
        notes.append(f"routing position {position!r} not in this model's {sorted(seg.routing)}; showing 'mean'")
        position = "mean"
    maps = seg.routing[position]
    if position == "mean" and seg.dominant_expert is not None:
        dominant = seg.dominant_expert
    else:
        dominant = np.argmax(maps, axis=0).astype(np.uint8)
    return position, maps, dominant


def result_layers(seg: Any, spec: Any, model_path: str, source: SourceInfo, request: Mapping[str, str],
                  position: str = "mean", maps: bool = True, record: Any = None) -> list[LayerDataTuple]:
    """Mask (visible), per-expert heatmaps and dominant expert (hidden), aligned with ``source``.

    The heatmaps are one stacked Image layer ``[experts, *grid]`` (first axis = expert) instead of E layers,
    so the layer list stays short; the dominant-expert labels hold expert index + 1 (0 stays transparent).
    """
    tag, model = attribute_text(request), model_label(model_path)
    notes: list[str] = []
    position, heat, dominant = _routing_for(seg, position, notes)
    prov = provenance(seg, spec, model_path, source, request, position, record)
    prov["warnings"] += notes
    geometry = {"scale": source.scale, "translate": source.translate}
    # copy the source metadata (the writer restores NIfTI/DICOM geometry from it), then our provenance
    base = {k: v for k, v in source.metadata.items() if k != RESULT_KEY}

    def meta(kind: str) -> dict[str, Any]:
        return {**base, RESULT_KEY: {**prov, "kind": kind, "tag": tag, "model_name": model}}

    classes = list(spec.class_names)
    layers: list[LayerDataTuple] = [(
        seg.labels,
        {"name": layer_name(source.name, "mask", tag, model), **geometry, "opacity": 0.5, "metadata": meta("mask"),
         "axis_labels": axis_labels(len(source.scale)),
         "features": {"index": list(range(len(classes))), "class": classes}},
        "labels",
    )]
    if maps and heat is not None:
        n_experts = heat.shape[0]
        extra = heat.ndim - len(source.scale)  # the leading expert axis
        layers.append((
            heat,
            {"name": layer_name(source.name, "experts", tag, model), "scale": (1.0,) * extra + tuple(source.scale),
             "translate": (0.0,) * extra + tuple(source.translate), "visible": False, "colormap": heat_colormap(),
             "contrast_limits": (0.0, 1.0), "blending": "translucent", "metadata": meta("experts"),
             "axis_labels": axis_labels(len(source.scale), expert_axis=True)},
            "image",
        ))
        names = ["none"] + [f"expert {e}" for e in range(n_experts)]
        layers.append((
            (dominant.astype(np.uint16) + 1).astype(np.uint8 if n_experts < 255 else np.uint16),
            {"name": layer_name(source.name, "dominant", tag, model), **geometry, "visible": False, "opacity": 0.6,
             "axis_labels": axis_labels(len(source.scale)),
             "colormap": expert_colormap(n_experts), "metadata": meta("dominant"),
             "features": {"index": list(range(n_experts + 1)), "expert": names}},
            "labels",
        ))
    return layers


def is_result(metadata: Mapping[str, Any]) -> bool:
    return isinstance(metadata.get(RESULT_KEY), Mapping) and "kind" in metadata[RESULT_KEY]


def data_digest(data: Any) -> str:
    """Content digest of layer data (dtype, shape and bytes), to tell later whether the user edited it.

    A digest rather than napari's paint events: those miss direct assignments to ``layer.data`` and call an edit
    that was undone a change. blake2b takes ~55 ms for a 300x512x512 uint8 mask on one core, once when the layer
    is made and once per re-run, next to minutes of inference.
    """
    arr = np.ascontiguousarray(np.asarray(data))
    digest = hashlib.blake2b(f"{arr.dtype.str}{arr.shape}".encode(), digest_size=16)
    digest.update(arr.data)
    return digest.hexdigest()


def is_edited(metadata: Mapping[str, Any], data: Any) -> bool:
    """True when a result layer's data differs from what we made. Layers without a digest (heatmaps) never
    count as edited; data that cannot be hashed does (keeping a layer is cheap, losing edits is not)."""
    stored = metadata.get(RESULT_KEY, {}).get(DIGEST_KEY) if is_result(metadata) else None
    if stored is None:
        return False
    try:
        return data_digest(data) != stored
    except (TypeError, ValueError, BufferError):
        return True


def edited_name(name: str, taken: Any, why: str = "edited") -> str:
    """``"<name> (edited)"``, or ``"<name> (edited 2)"``, ... when that is taken too."""
    candidate, n = f"{name} ({why})", 2
    while candidate in taken:
        candidate, n = f"{name} ({why} {n})", n + 1
    return candidate
