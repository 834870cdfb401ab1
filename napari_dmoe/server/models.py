"""The models a server keeps loaded, by id (the file name without .safetensors), loaded once per file.

State belongs to the server object, not the module: each ``create_app`` gets its own store.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


class ModelStore:
    """Models loaded at start-up on one device; ``get(id)``; ``describe()`` for ``/models``."""

    def __init__(self, paths: Sequence[str | Path], device: Any) -> None:
        from napari_dmoe.io.checkpoint import load_model

        if not paths:
            raise ValueError("dmoe serve needs at least one model file (.safetensors)")
        self.device = device
        self._models: dict[str, Any] = {}
        self._by_path: dict[Path, str] = {}
        for path in paths:
            resolved = Path(path).resolve()
            if resolved in self._by_path:  # the same file twice: one copy in memory
                continue
            stem = resolved.name.removesuffix(".safetensors")
            key, n = stem, 2
            while key in self._models:  # two files with one name from different folders
                key, n = f"{stem}-{n}", n + 1
            self._models[key] = load_model(resolved, device=device)  # on the serving device, kept there
            self._by_path[resolved] = key

    def ids(self) -> list[str]:
        return list(self._models)

    def get(self, model_id: str) -> Any:
        try:
            return self._models[model_id]
        except KeyError:
            raise LookupError(f"no model {model_id!r} on this server; it serves {self.ids()}") from None

    def describe(self) -> list[dict[str, Any]]:
        return [describe_model(key, model) for key, model in self._models.items()]


def describe_model(key: str, model: Any) -> dict[str, Any]:
    """What a client needs to offer the model: classes, attribute vocabularies, geometry, training record."""
    spec = model.spec
    prov = spec.provenance or {}
    return {
        "id": key,
        "file": Path(str(model.path)).name,
        "arch": spec.arch,
        "spatial_dims": spec.spatial_dims,
        "in_channels": spec.in_channels,
        "class_names": list(spec.class_names),
        "attributes": [{"name": a.name, "values": list(a.values)} for a in spec.attributes],
        "routing": spec.routing,
        "n_experts": spec.n_experts,
        "input_size": list(spec.input_size),
        "spacing": spec.spacing,
        # what it was trained on (issue 13's record; absent in older files), how, and how well it did
        "trained_on": getattr(spec, "trained_on", None),
        "training": {"method": prov.get("method"), "data": prov.get("data"), "router_counts": prov.get("router_counts")},
        "metrics": spec.metrics or {},
        "spec": spec.to_dict(),
    }
