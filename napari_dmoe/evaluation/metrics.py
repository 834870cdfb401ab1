"""Per-image segmentation metrics and the equity-scaled metrics of FairSeg.

Conventions (per image, per foreground class c; MONAI's compute_dice / compute_iou / compute_hausdorff_distance):
- Dice, IoU: both masks empty -> 1.0 (nothing to find, nothing found); exactly one empty -> 0.0.
  (MONAI's ``ignore_empty=False`` gives exactly this.)
- HD95 (95th percentile symmetric Hausdorff distance, in physical units when ``spacing`` is given, else pixels):
  both empty -> 0.0; exactly one empty -> NaN ("undefined"), left out of every HD95 mean and counted in
  ``hd95_undefined`` of the report. (MONAI returns NaN/inf with a warning there; we decide before calling it.)
- Means over images are plain means of the per-image values (HD95: NaN-excluded means).
- ES-M = M_all / (1 + sum_g |M_g - M_all|) (FairSeg), M_g the mean over images of group g, M_all over all images;
  groups with no image are left out of the sum.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou
from monai.networks.utils import one_hot

__all__ = ["FairnessError", "PerImage", "Metric", "METRICS", "register_metric", "image_metrics", "evaluate_image",
           "metric_values", "nan_mean", "group_means", "equity_scaled", "mean_dice"]


@dataclass(frozen=True)
class Metric:
    """One per-image metric of a foreground class.

    Args:
        key: the name in records, reports and CSV columns ("dice").
        label: the name in tables ("Dice").
        compute: ``compute(pred, truth, spacing) -> float`` on one class's boolean masks; None for the built-in
            Dice/IoU/HD95, which ``image_metrics`` computes with MONAI for every class at once.
        equity_scaled: the report also gives FairSeg's ES-<label> and its bootstrap CI (overlap metrics in [0, 1]).
        slow: left out (NaN) where speed matters, e.g. validation during training (``image_metrics(hd95=False)``).
    """

    key: str
    label: str
    compute: Callable[[np.ndarray, np.ndarray, Sequence[float] | None], float] | None = None
    equity_scaled: bool = False
    slow: bool = False


# The one list of metrics: ``dmoe evaluate``, validation, the fine-tune comparison and every report read it, so a
# metric registered here (``register_metric``) reaches all of them with no other edit.
METRICS: dict[str, Metric] = {
    "dice": Metric("dice", "Dice", equity_scaled=True),
    "iou": Metric("iou", "IoU", equity_scaled=True),
    "hd95": Metric("hd95", "HD95", slow=True),
}


def register_metric(metric: Metric) -> None:
    """Add a metric (its ``compute`` given) to every evaluation; a key already taken is refused."""
    if metric.key in METRICS or metric.compute is None:
        raise FairnessError(f"metric {metric.key!r}: the key is taken or no compute function was given")
    METRICS[metric.key] = metric


def equity_metrics() -> list[str]:
    """Keys of the metrics the report equity-scales (ES-Dice, ES-IoU, ...)."""
    return [k for k, m in METRICS.items() if m.equity_scaled]


class FairnessError(ValueError):
    """Inputs the fairness evaluation cannot use; the message names the problem and the fix."""


@dataclass
class PerImage:
    """Metrics of one image: ``metrics[class_name][metric]`` with metric in dice, iou, hd95."""

    id: str
    group: str
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)


def _as_labels(array, name: str, n_classes: int) -> np.ndarray:
    a = np.asarray(array)
    if a.dtype.kind == "f":
        if not np.all(np.isfinite(a)) or not np.array_equal(a, np.round(a)):
            raise FairnessError(f"{name} holds non-integer values; pass an integer label map (0 = background)")
    elif a.dtype.kind not in "iub":
        raise FairnessError(f"{name} has dtype {a.dtype}; pass an integer label map")
    a = a.astype(np.int64)
    if a.size and (a.min() < 0 or a.max() >= n_classes):
        raise FairnessError(
            f"{name} has labels {a.min()}..{a.max()} but n_classes={n_classes} (labels 0..{n_classes - 1})"
        )
    return a


def image_metrics(
    pred, gt, n_classes: int, spacing: Sequence[float] | None = None, class_names: Sequence[str] | None = None,
    hd95: bool = True,
) -> dict[str, dict[str, float]]:
    """Dice, IoU, HD95 of every foreground class 1..n_classes-1 of one image (label maps of equal shape).

    ``class_names``: all class names, background first (like ``ModelSpec.class_names``); default ``class1``...
    ``hd95=False`` leaves HD95 out (NaN): validation during training skips it, it is slow in 3D.
    """
    if n_classes < 2:
        raise FairnessError(f"n_classes={n_classes}: need background plus at least one foreground class")
    pred = _as_labels(pred, "prediction", n_classes)
    gt = _as_labels(gt, "ground truth", n_classes)
    if pred.shape != gt.shape:
        raise FairnessError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}")
    if class_names is None:
        class_names = ["background"] + [f"class{c}" for c in range(1, n_classes)]
    if len(class_names) != n_classes:
        raise FairnessError(f"got {len(class_names)} class names for {n_classes} classes (background first)")
    if spacing is not None:
        spacing = [float(s) for s in spacing]
        if len(spacing) != pred.ndim or min(spacing) <= 0:
            raise FairnessError(f"spacing {spacing} must hold {pred.ndim} positive values, one per image axis")

    p = one_hot(torch.from_numpy(pred)[None, None], n_classes, dim=1)
    g = one_hot(torch.from_numpy(gt)[None, None], n_classes, dim=1)
    dice = compute_dice(p, g, include_background=False, ignore_empty=False)[0]
    iou = compute_iou(p, g, include_background=False, ignore_empty=False)[0]
    out = {}
    for c in range(1, n_classes):
        in_pred, in_gt = bool(p[0, c].any()), bool(g[0, c].any())
        if not hd95:
            distance = math.nan
        elif in_pred and in_gt:
            with warnings.catch_warnings():  # MONAI 1.5+ warns about its own deprecated internal argument
                warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")
                distance = float(
                    compute_hausdorff_distance(p[:, c : c + 1], g[:, c : c + 1], include_background=True,
                                               percentile=95, spacing=spacing)[0, 0]
                )
        else:
            distance = 0.0 if not (in_pred or in_gt) else math.nan
        values = {"dice": float(dice[c - 1]), "iou": float(iou[c - 1]), "hd95": distance}
        for key, metric in METRICS.items():  # registered metrics beyond the MONAI three
            if metric.compute is not None:
                values[key] = math.nan if metric.slow and not hd95 else float(
                    metric.compute(pred == c, gt == c, spacing))
        out[class_names[c]] = values
    return out


def evaluate_image(id: str, group: str, pred, gt, n_classes: int, spacing: Sequence[float] | None = None,
                   class_names: Sequence[str] | None = None, hd95: bool = True) -> PerImage:
    """``image_metrics`` wrapped in a PerImage record."""
    return PerImage(str(id), str(group), image_metrics(pred, gt, n_classes, spacing, class_names, hd95))


def metric_values(records: Sequence[PerImage], class_name: str, metric: str = "dice") -> np.ndarray:
    """The per-image values of one class and metric, in record order."""
    if not records:
        raise FairnessError("no per-image records: evaluate at least one image")
    if metric not in METRICS:
        raise FairnessError(f"unknown metric {metric!r}; choose one of {list(METRICS)}")
    try:
        return np.array([r.metrics[class_name][metric] for r in records], dtype=float)
    except KeyError:
        raise FairnessError(
            f"class {class_name!r} is not in the records; they hold {sorted(records[0].metrics)}"
        ) from None


def nan_mean(values: np.ndarray) -> float:
    """Mean of the non-NaN values (NaN when there is none)."""
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else math.nan


def group_means(records: Sequence[PerImage], class_name: str, metric: str = "dice") -> dict[str, float]:
    """Mean of one metric per group (NaN-excluded), groups sorted by name."""
    values = metric_values(records, class_name, metric)
    groups = np.array([r.group for r in records])
    return {g: nan_mean(values[groups == g]) for g in sorted(set(groups.tolist()))}


def equity_scaled(metric_all: float, metric_by_group: dict[str, float] | Sequence[float]) -> float:
    """FairSeg's ES-M = M_all / (1 + sum_g |M_g - M_all|); NaN group means (absent groups) are left out."""
    by_group = metric_by_group.values() if isinstance(metric_by_group, dict) else metric_by_group
    gaps = [abs(m - metric_all) for m in by_group if not math.isnan(m)]
    return metric_all / (1.0 + sum(gaps))


def mean_dice(record: PerImage) -> float:
    """Mean foreground Dice of one image over its classes (NaN-excluded)."""
    return nan_mean(np.array([m["dice"] for m in record.metrics.values()], dtype=float))
