"""Validation during training: per-image Dice/IoU, per-group means and ES-Dice from ``evaluation``.

2D items come at the model's input size and run in batches through the network being trained. 3D volumes go
through ``evaluation.evaluate_cases``, the loop of ``dmoe evaluate``: the raw volume with its voxel size,
resampled to ``spec.spacing``, normalised, windows of the model's input size, probabilities mapped back, and
compared with the label on the file's own grid. HD95 is left out here (slow in 3D); ``dmoe evaluate`` reports it.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from napari_dmoe.evaluation.loop import case_from_item, evaluate_cases
from napari_dmoe.evaluation.metrics import PerImage, evaluate_image
from napari_dmoe.evaluation.report import fairness_report, summary_keys
from napari_dmoe.model.spec import ModelSpec


@torch.no_grad()
def validate(network: torch.nn.Module, items: Dataset, spec: ModelSpec, device: torch.device,
             to_router: Callable[[torch.Tensor], torch.Tensor], overlap: float = 0.25, amp: bool = False
             ) -> dict[str, Any]:
    """Summary of the validation split: ES-Dice (mean over classes), Dice, per-group Dice, per class."""
    was_training = network.training
    network.eval()
    try:
        if spec.spatial_dims == 3:
            records = _volumes(network, items, spec, device, overlap, amp)
        else:
            records = _batches(network, items, spec, device, to_router, amp)
    finally:
        network.train(was_training)
    if not records:
        return {}
    report = fairness_report(records, n_boot=0)
    # every metric of the report (evaluation.metrics.METRICS and their ES- forms); groups by Dice (the checkpoint)
    classes = {c: {**{k: v[k] for k in summary_keys()}, "groups": {g: gv["dice"] for g, gv in v["groups"].items()}}
               for c, v in report["classes"].items()}
    group_names = report["groups"]
    groups = {g: float(np.mean([classes[c]["groups"][g] for c in classes])) for g in group_names}
    return {"n": len(records), "es_dice": report["mean_over_classes"]["es_dice"],
            "dice": report["mean_over_classes"]["dice"], "groups": groups, "classes": classes}


def _batches(network: torch.nn.Module, items: Dataset, spec: ModelSpec, device: torch.device,
             to_router: Callable[[torch.Tensor], torch.Tensor], amp: bool) -> list[PerImage]:
    """2D: batches of items at the model's input size, scored per image."""
    autocast = torch.autocast("cuda", dtype=torch.float16, enabled=amp and device.type == "cuda")
    records: list[PerImage] = []
    for batch in DataLoader(items, batch_size=8, shuffle=False, num_workers=0):
        with autocast:
            logits = network(batch["image"].to(device), to_router(batch["attr"]).to(device))
        pred = logits.float().argmax(1).cpu().numpy()
        for b in range(pred.shape[0]):
            records.append(evaluate_image(batch["id"][b], batch["group"][b], pred[b], batch["label"][b].numpy(),
                                          spec.n_classes, class_names=spec.class_names, hd95=False))
    return records


def _volumes(network: torch.nn.Module, items: Dataset, spec: ModelSpec, device: torch.device, overlap: float,
             amp: bool) -> list[PerImage]:
    """3D: each raw volume through ``evaluate_cases`` (``EvalItems`` gives spacing and attribute values).

    The engine picks the router from the values as ``spec.router_index`` does, which for the training spec is
    the combination index ``to_router`` maps (dMoE) or router 0 (one router or none)."""
    cases = (case_from_item(item, item["values"], item["spacing"]) for item in map(items.__getitem__,
                                                                                   range(len(items))))
    result = evaluate_cases(_Model(spec, network), cases, hd95=False, device=str(device), overlap=overlap,
                            sw_batch_size=1, amp=amp, routing=False)
    return result.records


class _Model:
    """What ``inference.segment`` needs of a model: the spec and the network being trained."""

    def __init__(self, spec: ModelSpec, network: torch.nn.Module) -> None:
        self.spec, self.network = spec, network
