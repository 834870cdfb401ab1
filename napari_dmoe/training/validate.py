"""Validation during training: per-image Dice/IoU, per-group means and ES-Dice through ``fairness.py``.

2D items come at the model's input size and run in batches; 3D volumes run through MONAI's sliding window
with ROI = the model's input size. HD95 is left out here (slow in 3D); ``dmoe evaluate`` reports it.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.metrics import compute_dice, compute_iou
from monai.networks.utils import one_hot
from torch.utils.data import DataLoader, Dataset

from napari_dmoe.fairness import PerImage, fairness_report
from napari_dmoe.model.spec import ModelSpec


def _records(pred: torch.Tensor, label: torch.Tensor, batch: dict, spec: ModelSpec) -> list[PerImage]:
    n = spec.n_classes
    p = one_hot(pred[:, None], n, dim=1)
    g = one_hot(label[:, None].long(), n, dim=1)
    dice = compute_dice(p, g, include_background=False, ignore_empty=False)
    iou = compute_iou(p, g, include_background=False, ignore_empty=False)
    out = []
    for b in range(pred.shape[0]):
        metrics = {spec.class_names[c]: {"dice": float(dice[b, c - 1]), "iou": float(iou[b, c - 1]),
                                         "hd95": math.nan} for c in range(1, n)}
        out.append(PerImage(str(batch["id"][b]), str(batch["group"][b]), metrics))
    return out


@torch.no_grad()
def validate(network: torch.nn.Module, items: Dataset, spec: ModelSpec, device: torch.device,
             to_router: Callable[[torch.Tensor], torch.Tensor], overlap: float = 0.25, amp: bool = False
             ) -> dict[str, Any]:
    """Summary of the validation split: ES-Dice (mean over classes), Dice, per-group Dice, per class."""
    was_training = network.training
    network.eval()
    records: list[PerImage] = []
    batch_size = 8 if spec.spatial_dims == 2 else 1
    loader = DataLoader(items, batch_size=batch_size, shuffle=False, num_workers=0)
    autocast = torch.autocast("cuda", dtype=torch.float16, enabled=amp and device.type == "cuda")
    try:
        for batch in loader:
            x = batch["image"].to(device)
            attr = to_router(batch["attr"]).to(device)
            with autocast:
                if spec.spatial_dims == 2:
                    logits = network(x, attr)
                else:
                    logits = sliding_window_inference(x, spec.input_size, 1, network, overlap, "gaussian",
                                                      attr=attr)
            records += _records(logits.float().argmax(1).cpu(), batch["label"], batch, spec)
    finally:
        network.train(was_training)
    if not records:
        return {}
    report = fairness_report(records, n_boot=0)
    classes = {c: {"dice": v["dice"], "es_dice": v["es_dice"], "iou": v["iou"],
                   "groups": {g: gv["dice"] for g, gv in v["groups"].items()}}
               for c, v in report["classes"].items()}
    group_names = report["groups"]
    groups = {g: float(np.mean([classes[c]["groups"][g] for c in classes])) for g in group_names}
    return {"n": len(records), "es_dice": report["mean_over_classes"]["es_dice"],
            "dice": report["mean_over_classes"]["dice"], "groups": groups, "classes": classes}
