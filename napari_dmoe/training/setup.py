"""Everything a run needs before the first step: datasets (checked), spec, network, initial weights, loss."""
from __future__ import annotations

import copy
import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from napari_dmoe.datasets.base import DatasetReport, check_dataset
from napari_dmoe.model import PRESETS, build_network, make_spec, preset_arch
from napari_dmoe.model.spec import ModelSpec, SpecError

from napari_dmoe.training.config import ConfigError, method_routing
from napari_dmoe.training.data import EvalItems, TrainItems, class_names, group_counts, make_dataset, vocabulary
from napari_dmoe.distributed import DistInfo
from napari_dmoe.training.local import (adapted_routers, describe_adaptation, inherit_local_experts,
                                       prepare_group_local, with_base_counts)
from napari_dmoe.training.losses import build_loss
from napari_dmoe.training.pretrained import load_base_model, load_pretrained_vit, set_trainable
from napari_dmoe.model.routers import fallback_table, router_counts
from napari_dmoe.training.trained_on import FORMAT_MODALITY, describe_training_data, feature_record, scale_record


@dataclass
class RunParts:
    spec: ModelSpec
    network: torch.nn.Module
    train_items: TrainItems
    val_items: EvalItems | None
    loss: torch.nn.Module
    to_router: Callable[[torch.Tensor], torch.Tensor]
    train_router: Callable[[torch.Tensor, int, int], torch.Tensor]  # (groups, step, rank): with router dropout
    data_summary: dict[str, Any]
    identity: Any  # the config parts a resumed run must share with the original
    provenance: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    _features: tuple[Any, ...] | None = None  # (step, features, scale): best and last of one step share them

    def spec_for(self, step: int, metrics: Mapping[str, Any] | None, network: torch.nn.Module | None = None,
                 **extra: Any) -> ModelSpec:
        """The spec to save with the weights at ``step``: provenance, validation metrics when given, and the
        features of ``network`` (default the trained one) on its training images (``trained_on.feature_record``)
        for the fit check, and its foreground scale there for a site calibration (``trained_on.scale_record``)."""
        spec = copy.deepcopy(self.spec)
        spec.provenance = {**self.provenance, "step": step, **extra}
        if metrics:
            spec.metrics = {"split": "val", "step": step, **metrics}
        network = self.network if network is None else network
        if self._features is None or self._features[0] != (step, id(network)):
            val = self.val_items.ds if self.val_items is not None else None
            self._features = ((step, id(network)),
                              feature_record(network, self.spec, self.train_items.ds, val, self.seed),
                              scale_record(network, self.spec, self.train_items.ds, self.seed))
        if spec.trained_on is not None:
            extra = {"features": self._features[1], "scale": self._features[2]}
            spec.trained_on = {**spec.trained_on, **{k: v for k, v in extra.items() if v is not None}}
        return spec


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _spec(config: Mapping[str, Any], in_channels: int) -> ModelSpec:
    model, data = config["model"], config["data"]
    routing, _ = method_routing(config["method"])
    attrs = vocabulary(config)
    overrides = dict(model["overrides"])
    try:
        preset_arch(model["preset"])
        spec = make_spec(model["preset"], attrs[0].name, attrs[0].values, class_names(config), routing=routing,
                         n_experts=model["n_experts"], top_k=model["top_k"], router_mix=model["router_mix"],
                         in_channels=in_channels,
                         normalization=data["normalization"] or {"kind": "zscore"}, **overrides)
        spec.attributes = attrs  # intersectional: one router per combination (spec.router_index)
        spec.validate()
    except (SpecError, TypeError) as err:
        raise ConfigError(f"config key 'model': {err} (presets: {sorted(PRESETS)})") from None
    return spec


def _summary(ds: Any, report: DatasetReport | None) -> dict[str, Any]:
    out = {"n": len(ds), "groups": group_counts(ds), "skipped": dict(ds.skipped)}
    if ds.spacing is not None and report is not None:
        out["spacing"] = {"target": list(ds.spacing), "resampled": report.resampled,
                          "unknown": report.unknown_spacing}
    return out


def _router_maps(spec: ModelSpec, routing: str, config: Mapping[str, Any]) -> tuple[Callable, Callable]:
    """Group index -> router index: for validation and inference (``to_router``), and for training steps
    (``train_router(groups, step, rank)``, with ``sampling.router_dropout``)."""
    dropout = float(config["sampling"]["router_dropout"]) if routing == "dmoe" else 0.0
    seed = int(config["seed"])

    def to_router(groups: torch.Tensor) -> torch.Tensor:
        # Combination index == router index for dMoE (same mixed radix); one router (or none) otherwise.
        return groups if routing == "dmoe" else torch.zeros_like(groups)

    def train_router(groups: torch.Tensor, step: int, rank: int) -> torch.Tensor:
        routers = to_router(groups)
        if not dropout:
            return routers
        # drawn from (seed, step, rank): a resumed run and every process draw what an unbroken run would
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step * 1_009 + rank)
        drop = torch.rand(routers.shape, generator=gen) < dropout
        other = torch.randint(0, spec.n_routers, routers.shape, generator=gen)
        return torch.where(drop.to(routers.device), other.to(routers.device, routers.dtype), routers)

    return to_router, train_router


def build_run(config: Mapping[str, Any], info: DistInfo, command: str | None = None) -> RunParts:
    spec = _spec(config, in_channels=1)
    size = spec.input_size if spec.spatial_dims == 2 else config["data"]["size"]
    if spec.spatial_dims == 2 and config["data"]["size"] not in (None, list(spec.input_size)):
        raise ConfigError(f"config key 'data.size': 2D images are resized to the model's input size "
                          f"{spec.input_size}; drop data.size or set model.overrides.img_size")
    # 3D: volumes are resampled to the model's voxel size, as inference does (files that state theirs)
    spacing = spec.spacing if spec.spatial_dims == 3 else None
    if spacing is not None and config["data"]["size"] is not None:
        raise ConfigError(f"config key 'data.size': volumes are resampled to the model's spacing {spec.spacing} mm, "
                          "as at inference; a fixed size would train on another voxel size. Drop data.size "
                          "(or model.overrides.spacing)")
    train_ds = make_dataset(config, "train", size, spacing)
    val_ds = make_dataset(config, "val", size, spacing)
    if config["crossval"]["folds"]:  # cross-validation holds each case back in turn: every case trains at the end
        train_ds.records, val_ds.records = train_ds.records + val_ds.records, []
    if len(train_ds) == 0:
        raise ConfigError(f"config key 'data.root': no training items found in {config['data']['root']}")
    reports = {"train": check_dataset(train_ds), "val": check_dataset(val_ds) if len(val_ds) else None}
    in_channels = config["data"]["in_channels"] or int(train_ds[0]["image"].shape[0])
    spec = _spec(config, in_channels)
    data = config["data"]
    spec.trained_on = describe_training_data(train_ds, data["modality"] or FORMAT_MODALITY.get(data["format"]),
                                             seed=int(config["seed"]))
    inherit_local_experts(spec, config["model"]["base_model"])
    network = build_network(spec)
    init: dict[str, Any] = {}
    if config["model"]["init_from"]:
        init.update(load_pretrained_vit(network, config["model"]["init_from"]))
    if config["model"]["base_model"]:
        init.update(load_base_model(network, config["model"]["base_model"]))
    summary = {"train": _summary(train_ds, reports["train"]), "val": _summary(val_ds, reports["val"]),
               "warnings": [w for r in reports.values() if r for w in r.warnings]}
    train_items = TrainItems(train_ds, spec, config["augment"], int(config["seed"]), crop=spec.spatial_dims == 3,
                             group_balance=config["sampling"]["group_balance"])
    local = None
    if config["trainable"] == "group_local":
        routers = adapted_routers(spec, config["adapt_groups"], summary["train"]["groups"])
        local = prepare_group_local(network, spec, routers, train_items, config["local_experts"])
    init["trainable_parameters"] = (local["trainable_parameters"] if local
                                    else set_trainable(network, config["trainable"]))
    counts = with_base_counts(router_counts(spec, summary["train"]["groups"]), config["model"]["base_model"])
    _, loss_name = method_routing(config["method"])
    routing = spec.routing
    provenance = {
        "method": config["method"], "config": json.loads(json.dumps(config)), "command": command,
        "seed": config["seed"], "git_commit": git_commit(), "world_size": info.world_size, "data": summary,
        "router_counts": counts,
        "router_fallback": fallback_table(spec, counts, config["fallback_min_cases"]) if counts is not None
        else {"min_cases": config["fallback_min_cases"], "routers": {}},  # a base without counts: all trained
        "init": init, "loss": loss_name,
    }
    if config["model"]["base_model"] or local:  # a fine-tune: which groups it adapted, and how
        provenance["adaptation"] = describe_adaptation(config, spec, local)
    identity = json.loads(json.dumps({k: config[k] for k in ("data", "model", "method", "seed", "trainable",
                                                              "adapt_groups", "local_experts")}))

    to_router, train_router = _router_maps(spec, routing, config)

    return RunParts(
        spec=spec, network=network,
        train_items=train_items,
        val_items=EvalItems(val_ds, spec) if len(val_ds) else None,
        loss=build_loss(loss_name, spec.n_classes, gamma=config["febs_gamma"]).to(info.device),
        to_router=to_router, train_router=train_router, data_summary=summary, identity=identity, provenance=provenance,
        seed=int(config["seed"]),
    )
