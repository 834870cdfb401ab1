"""The models a server keeps loaded, by id (the file name without .safetensors), loaded once per file.

State belongs to the server object, not the module: each ``create_app`` gets its own store.
"""
from __future__ import annotations

import re
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
        "trained_on": public_trained_on(getattr(spec, "trained_on", None)),
        "training": {"method": prov.get("method"), "data": public(prov.get("data")),
                     "router_counts": prov.get("router_counts")},
        "metrics": public(spec.metrics or {}),
        "spec": public_spec(spec.to_dict()),
    }


# what /models may publish of a model's training record: counts and settings. The training config and command
# name the data folders and output paths of the machine that trained it, so they stay out
PUBLIC_PROVENANCE = ("method", "seed", "git_commit", "world_size", "data", "router_counts", "router_fallback",
                     "init", "loss", "step", "adaptation", "finetune")
_PATH = re.compile(r"(?<![^\s=(\['\"])(?:[A-Za-z]:[\\/]|\\\\|~/|/(?=[^\s/]))[^\s'\",;]*")  # C:\, \\host, ~/, /x


def public_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec as ``/models`` publishes it: provenance reduced to ``PUBLIC_PROVENANCE``, local paths removed."""
    out = dict(spec)
    prov = out.get("provenance") or {}
    out["provenance"] = {key: prov[key] for key in PUBLIC_PROVENANCE if key in prov}
    out["trained_on"] = public_trained_on(out.get("trained_on"))
    return public(out)


def public_trained_on(record: Any) -> Any:
    """The training-data record without the feature statistics (40-210 kB a model, useful only beside the
    network, which stays on the server): their method and threshold are kept, so a client can say how the server
    checks an image."""
    if not isinstance(record, dict) or not isinstance(record.get("features"), dict):
        return record
    features = record["features"]
    summary = {k: features[k] for k in ("method", "threshold", "quantile", "margin", "n_train") if k in features}
    return {**record, "features": {**summary, "on_server": True}}


def public(value: Any) -> Any:
    """``value`` with every absolute or home-relative path in its strings replaced by ``<path>``."""
    if isinstance(value, dict):
        return {k: public(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [public(v) for v in value]
    return _PATH.sub("<path>", value) if isinstance(value, str) else value
