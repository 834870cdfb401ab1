"""Per-image and per-group segmentation metrics, equity-scaled metrics (FairSeg), bootstrap CIs, reports, plots.

Conventions (per image, per foreground class c; MONAI's compute_dice / compute_iou / compute_hausdorff_distance):
- Dice, IoU: both masks empty -> 1.0 (nothing to find, nothing found); exactly one empty -> 0.0.
  (MONAI's ``ignore_empty=False`` gives exactly this.)
- HD95 (95th percentile symmetric Hausdorff distance, in physical units when ``spacing`` is given, else pixels):
  both empty -> 0.0; exactly one empty -> NaN ("undefined"), left out of every HD95 mean and counted in
  ``hd95_undefined`` of the report. (MONAI returns NaN/inf with a warning there; we decide before calling it.)
- Means over images are plain means of the per-image values (HD95: NaN-excluded means).
- ES-M = M_all / (1 + sum_g |M_g - M_all|) (FairSeg), M_g the mean over images of group g, M_all over all images;
  groups with no image are left out of the sum.
- Bootstrap: resample images with replacement (not stratified by group: the group sizes vary as they would in a
  new sample of the same population), recompute the statistic, take the 2.5 / 97.5 percentiles. A resample that
  lacks a group gives NaN for that group's statistic and is ignored by the percentile (nanpercentile).
"""
from __future__ import annotations

import csv
import json
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou
from monai.networks.utils import one_hot

__all__ = [
    "FairnessError", "PerImage", "image_metrics", "evaluate_image", "metric_values", "group_means",
    "equity_scaled", "bootstrap_ci", "fairness_report", "write_report", "plot_violins", "plot_expert_usage",
    "compare_reports",
]

METRICS = ("dice", "iou", "hd95")


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
    pred, gt, n_classes: int, spacing: Sequence[float] | None = None, class_names: Sequence[str] | None = None
) -> dict[str, dict[str, float]]:
    """Dice, IoU, HD95 of every foreground class 1..n_classes-1 of one image (label maps of equal shape).

    ``class_names``: all class names, background first (like ``ModelSpec.class_names``); default ``class1``...
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
        if in_pred and in_gt:
            with warnings.catch_warnings():  # MONAI 1.5+ warns about its own deprecated internal argument
                warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")
                hd95 = float(
                    compute_hausdorff_distance(p[:, c : c + 1], g[:, c : c + 1], include_background=True,
                                               percentile=95, spacing=spacing)[0, 0]
                )
        else:
            hd95 = 0.0 if not (in_pred or in_gt) else math.nan
        out[class_names[c]] = {"dice": float(dice[c - 1]), "iou": float(iou[c - 1]), "hd95": hd95}
    return out


def evaluate_image(id: str, group: str, pred, gt, n_classes: int, spacing: Sequence[float] | None = None,
                   class_names: Sequence[str] | None = None) -> PerImage:
    """``image_metrics`` wrapped in a PerImage record."""
    return PerImage(str(id), str(group), image_metrics(pred, gt, n_classes, spacing, class_names))


def metric_values(records: Sequence[PerImage], class_name: str, metric: str = "dice") -> np.ndarray:
    """The per-image values of one class and metric, in record order."""
    if not records:
        raise FairnessError("no per-image records: evaluate at least one image")
    if metric not in METRICS:
        raise FairnessError(f"unknown metric {metric!r}; choose one of {METRICS}")
    try:
        return np.array([r.metrics[class_name][metric] for r in records], dtype=float)
    except KeyError:
        raise FairnessError(
            f"class {class_name!r} is not in the records; they hold {sorted(records[0].metrics)}"
        ) from None


def _mean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else math.nan


def group_means(records: Sequence[PerImage], class_name: str, metric: str = "dice") -> dict[str, float]:
    """Mean of one metric per group (NaN-excluded), groups sorted by name."""
    values = metric_values(records, class_name, metric)
    groups = np.array([r.group for r in records])
    return {g: _mean(values[groups == g]) for g in sorted(set(groups.tolist()))}


def equity_scaled(metric_all: float, metric_by_group: dict[str, float] | Sequence[float]) -> float:
    """FairSeg's ES-M = M_all / (1 + sum_g |M_g - M_all|); NaN group means (absent groups) are left out."""
    by_group = metric_by_group.values() if isinstance(metric_by_group, dict) else metric_by_group
    gaps = [abs(m - metric_all) for m in by_group if not math.isnan(m)]
    return metric_all / (1.0 + sum(gaps))


def _resample_indices(n_images: int, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n_images, size=(n, n_images))


def bootstrap_ci(records: Sequence[PerImage], statistic: Callable[[Sequence[PerImage]], float], n: int = 1000,
                 seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of ``statistic(records)`` over images resampled with replacement."""
    if not records:
        raise FairnessError("no per-image records: evaluate at least one image")
    stats = np.array([statistic([records[i] for i in idx]) for idx in _resample_indices(len(records), n, seed)])
    return _percentiles(stats, level)


def _percentiles(stats: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    if np.all(np.isnan(stats)):
        return (math.nan, math.nan)
    tail = 50.0 * (1.0 - level)
    low, high = np.nanpercentile(stats, [tail, 100.0 - tail])
    return (float(low), float(high))


def _bootstrap_class(values: dict[str, np.ndarray], codes: np.ndarray, n_groups: int, idx: np.ndarray) -> dict:
    """Vectorised bootstrap of overall/per-group Dice and ES-Dice/ES-IoU; same resamples as bootstrap_ci."""
    member = codes[idx][..., None] == np.arange(n_groups)  # [n, N, G]
    counts = member.sum(1)
    out = {}
    for metric in ("dice", "iou"):
        v = values[metric][idx]  # [n, N]
        overall = v.mean(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            per_group = (v[..., None] * member).sum(1) / counts  # NaN where a group is absent
        gaps = np.nansum(np.abs(per_group - overall[:, None]), axis=1)
        out[metric] = overall
        out[f"es_{metric}"] = overall / (1.0 + gaps)
        out[f"groups_{metric}"] = per_group
    return out


def _clean(x):
    """JSON-safe copy: NaN/inf -> None, numpy scalars -> float, tuples -> lists."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def fairness_report(records: Sequence[PerImage], class_names: Sequence[str] | None = None, n_boot: int = 1000,
                    seed: int = 0, name: str | None = None) -> dict:
    """JSON-serialisable summary per class: means, per-group means and counts, ES-Dice/IoU, worst group, 95% CIs.

    ``class_names``: the foreground classes to report (keys of the records); default all of them.
    """
    if not records:
        raise FairnessError("no per-image records: evaluate at least one image")
    class_names = list(class_names) if class_names is not None else list(records[0].metrics)
    groups = sorted({r.group for r in records})
    codes = np.array([groups.index(r.group) for r in records])
    idx = _resample_indices(len(records), n_boot, seed)
    classes = {}
    for cname in class_names:
        values = {m: metric_values(records, cname, m) for m in METRICS}
        means = {m: _mean(values[m]) for m in METRICS}
        by_group = {m: group_means(records, cname, m) for m in METRICS}
        boot = _bootstrap_class(values, codes, len(groups), idx)
        worst = min(groups, key=lambda g: by_group["dice"][g])
        classes[cname] = {
            **means,
            "hd95_undefined": int(np.isnan(values["hd95"]).sum()),
            "es_dice": equity_scaled(means["dice"], by_group["dice"]),
            "es_iou": equity_scaled(means["iou"], by_group["iou"]),
            "worst_group": worst,
            "worst_group_dice": by_group["dice"][worst],
            "groups": {g: {"n": int((codes == k).sum()), **{m: by_group[m][g] for m in METRICS}}
                       for k, g in enumerate(groups)},
            "ci95": {
                **{key: _percentiles(boot[key]) for key in ("dice", "iou", "es_dice", "es_iou")},
                "groups": {g: {"dice": _percentiles(boot["groups_dice"][:, k])} for k, g in enumerate(groups)},
            },
        }
    summary = {key: float(np.mean([classes[c][key] for c in class_names])) for key in ("dice", "iou", "es_dice",
                                                                                         "es_iou")}
    return _clean({
        "name": name, "n_images": len(records), "groups": groups, "classes": classes,
        "mean_over_classes": summary, "bootstrap": {"n": n_boot, "seed": seed, "level": 0.95, "stratified": False},
    })


def write_report(report: dict, records: Sequence[PerImage], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.csv`` (one row per image: id, group, per-class dice/iou/hd95)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out_dir / "report.json", out_dir / "report.csv"
    json_path.write_text(json.dumps(_clean(report), indent=2, allow_nan=False))
    class_names = list(records[0].metrics) if records else []
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "group"] + [f"{c}_{m}" for c in class_names for m in METRICS])
        for r in records:
            cells = [r.metrics[c][m] for c in class_names for m in METRICS]
            writer.writerow([r.id, r.group] + ["" if math.isnan(v) else f"{v:.6g}" for v in cells])
    return json_path, csv_path


def _figure(width: float, height: float):
    # A bare Figure renders with the Agg canvas and never touches pyplot's global state or a Qt backend.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def plot_violins(records: Sequence[PerImage], class_names: Sequence[str], path: str | Path) -> Path:
    """Dice distribution per group, one panel per class (paper figure 3 style); writes a PNG."""
    groups = sorted({r.group for r in records})
    fig = _figure(3.2 * len(class_names) + 0.8, 3.6)
    axes = fig.subplots(1, len(class_names), squeeze=False)[0]
    jitter = np.random.default_rng(0)
    for ax, cname in zip(axes, class_names):
        values = metric_values(records, cname, "dice")
        labels = np.array([r.group for r in records])
        data = [values[labels == g] for g in groups]
        spread = [k for k, d in enumerate(data) if d.size > 1 and np.ptp(d) > 0]  # KDE needs spread
        if spread:
            parts = ax.violinplot([data[k] for k in spread], positions=[k + 1 for k in spread], showmeans=True)
            for body in parts["bodies"]:
                body.set_alpha(0.4)
        for k, d in enumerate(data):
            ax.scatter(k + 1 + jitter.uniform(-0.08, 0.08, d.size), d, s=8, color="black", alpha=0.6)
        ax.set_xticks(range(1, len(groups) + 1), groups, rotation=30)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(cname)
        ax.set_ylabel("Dice")
    fig.savefig(path)
    return Path(path)


def plot_expert_usage(matrix, group_names: Sequence[str], path: str | Path) -> Path:
    """Heatmap of mean gate weight per attribute value (rows) and expert (columns), annotated; writes a PNG."""
    m = np.asarray(matrix, dtype=float)
    if m.ndim != 2 or m.shape[0] != len(group_names):
        raise FairnessError(f"expert usage must be [groups, experts] with {len(group_names)} rows, got {m.shape}")
    fig = _figure(0.7 * m.shape[1] + 2.5, 0.5 * m.shape[0] + 1.8)
    ax = fig.subplots()
    image = ax.imshow(m, cmap="viridis", vmin=0.0, aspect="auto")
    for (i, j), v in np.ndenumerate(m):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8,
                color="white" if v < 0.6 * (m.max() or 1.0) else "black")
    ax.set_xticks(range(m.shape[1]), [str(j) for j in range(m.shape[1])])
    ax.set_yticks(range(m.shape[0]), list(group_names))
    ax.set_xlabel("expert")
    ax.set_ylabel("attribute")
    fig.colorbar(image, ax=ax, label="mean gate weight")
    fig.savefig(path)
    return Path(path)


def _fmt(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def compare_reports(paths: Sequence[str | Path]) -> str:
    """Markdown table of several report.json files side by side (method = report name or parent folder)."""
    reports, names = [], []
    for p in map(Path, paths):
        try:
            report = json.loads(p.read_text())
        except (OSError, ValueError) as err:
            raise FairnessError(f"{p}: cannot read this report.json ({err}); run `dmoe evaluate` first") from err
        if not isinstance(report, dict) or not isinstance(report.get("classes"), dict):
            raise FairnessError(f"{p}: not a fairness report (no 'classes' table); pass report.json files")
        reports.append(report)
        names.append(report.get("name") or p.resolve().parent.name)
    rows = []
    for cname in dict.fromkeys(c for r in reports for c in r["classes"]):
        groups = list(dict.fromkeys(g for r in reports for g in r["classes"].get(cname, {}).get("groups", {})))
        keys = [("Dice", "dice"), ("IoU", "iou"), ("HD95", "hd95"), ("ES-Dice", "es_dice"), ("ES-IoU", "es_iou"),
                ("worst-group Dice", "worst_group_dice")]
        for label, key in keys:
            rows.append([f"{cname} {label}"] + [_fmt(r["classes"].get(cname, {}).get(key)) for r in reports])
        for g in groups:
            rows.append([f"{cname} Dice [{g}]"] + [
                _fmt(r["classes"].get(cname, {}).get("groups", {}).get(g, {}).get("dice")) for r in reports])
    header = ["metric"] + names
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
    lines = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |" for row in [header] + rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
