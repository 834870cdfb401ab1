"""Validation during training: per-image Dice/IoU, per-group means and ES-Dice through ``fairness.py``.

2D items come at the model's input size and run in batches. 3D volumes are segmented by the inference engine
(``inference.segment``) exactly as ``dmoe evaluate`` and the Segment widget do: the raw volume with its voxel
size, resampled to ``spec.spacing``, normalised, windows of the model's input size, probabilities mapped back,
and compared with the label on the file's own grid. HD95 is left out here (slow in 3D); ``dmoe evaluate``
reports it.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
from monai.metrics import compute_dice, compute_iou
from monai.networks.utils import one_hot
from torch.utils.data import DataLoader, Dataset

from napari_dmoe.evaluation.fairness import PerImage, fairness_report
from napari_dmoe.model.spec import ModelSpec


def _records(pred: torch.Tensor, label: torch.Tensor, batch: dict, spec: ModelSpec) -> list[PerImage]:
    """Per-image Dice/IoU of a batch ``pred``/``label`` ``[B, *spatial]``; ``batch`` gives ids and groups."""
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
    autocast = torch.autocast("cuda", dtype=torch.float16, enabled=amp and device.type == "cuda")
    try:
        if spec.spatial_dims == 3:
            records = _volumes(network, items, spec, device, overlap, amp)
        else:
            for batch in DataLoader(items, batch_size=8, shuffle=False, num_workers=0):
                x = batch["image"].to(device)
                attr = to_router(batch["attr"]).to(device)
                with autocast:
                    logits = network(x, attr)
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


def _volumes(network: torch.nn.Module, items: Dataset, spec: ModelSpec, device: torch.device, overlap: float,
             amp: bool) -> list[PerImage]:
    """3D: each raw volume through the inference engine (``EvalItems`` gives spacing and attribute values).

    The engine picks the router from the values as ``spec.router_index`` does, which for the training spec is
    the combination index ``to_router`` maps (dMoE) or router 0 (one router or none)."""
    from napari_dmoe.inference.engine import InferenceError, segment

    model = _Model(spec, network)
    records: list[PerImage] = []
    for index in range(len(items)):
        item = items[index]
        image, rgb = item["image"], item["image"].shape[0] in (3, 4)  # [C, z, y, x] from the dataset
        image = np.moveaxis(image, 0, -1) if rgb else image[0]
        try:
            seg = segment(model, image, item["values"], spacing=item["spacing"], device=str(device),
                          overlap=overlap, sw_batch_size=1, amp=amp, routing=False, rgb=rgb)
        except InferenceError as err:
            raise InferenceError(f"validation case {item['id']!r}: {err}") from None
        pred = torch.from_numpy(seg.labels.astype(np.int64))[None]
        label = torch.from_numpy(np.asarray(item["label"], dtype=np.int64))[None]
        records += _records(pred, label, {"id": [item["id"]], "group": [item["group"]]}, spec)
    return records


class _Model:
    """What ``inference.segment`` needs of a model: the spec and the network being trained."""

    def __init__(self, spec: ModelSpec, network: torch.nn.Module) -> None:
        self.spec, self.network = spec, network
