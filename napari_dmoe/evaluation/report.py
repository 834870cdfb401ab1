"""The per-group fairness report: means, per-group means, ES-Dice/ES-IoU, bootstrap CIs; its JSON/CSV files
and the side-by-side Markdown table of several reports.

Bootstrap: resample images with replacement (not stratified by group: the group sizes vary as they would in a
new sample of the same population), recompute the statistic, take the 2.5 / 97.5 percentiles. A resample that
lacks a group gives NaN for that group's statistic and is ignored by the percentile (nanpercentile).
"""
from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from napari_dmoe.evaluation.metrics import (
    METRICS, FairnessError, PerImage, equity_metrics, equity_scaled, group_means, metric_values, nan_mean,
)
from napari_dmoe.io.files import atomic_write
from napari_dmoe.model.routers import group_values

__all__ = ["bootstrap_ci", "fairness_report", "by_attribute", "write_report", "write_json", "compare_reports"]


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
    for metric in equity_metrics():
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


def summary_keys() -> list[str]:
    """The keys of ``mean_over_classes``: every metric and every equity-scaled one."""
    return [*METRICS, *(f"es_{m}" for m in equity_metrics())]


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
        means = {m: nan_mean(values[m]) for m in METRICS}
        by_group = {m: group_means(records, cname, m) for m in METRICS}
        boot = _bootstrap_class(values, codes, len(groups), idx)
        worst = min(groups, key=lambda g: by_group["dice"][g])
        classes[cname] = {
            **means,
            "hd95_undefined": int(np.isnan(values["hd95"]).sum()),
            **{f"es_{m}": equity_scaled(means[m], by_group[m]) for m in equity_metrics()},
            "worst_group": worst,
            "worst_group_dice": by_group["dice"][worst],
            "groups": {g: {"n": int((codes == k).sum()), **{m: by_group[m][g] for m in METRICS}}
                       for k, g in enumerate(groups)},
            "ci95": {
                **{key: _percentiles(boot[key]) for m in equity_metrics() for key in (m, f"es_{m}")},
                "groups": {g: {"dice": _percentiles(boot["groups_dice"][:, k])} for k, g in enumerate(groups)},
            },
        }
    summary = {key: float(np.mean([classes[c][key] for c in class_names])) for key in summary_keys()}
    return _clean({
        "name": name, "n_images": len(records), "groups": groups, "classes": classes,
        "mean_over_classes": summary, "bootstrap": {"n": n_boot, "seed": seed, "level": 0.95, "stratified": False},
    })


def by_attribute(records: Sequence[PerImage], names: Sequence[str], class_names: Sequence[str] | None = None,
                 n_boot: int = 1000, name: str | None = None) -> dict[str, dict]:
    """Intersectional groups ("a/b") reported per single attribute: ``{attribute: fairness_report}``."""
    out = {}
    for k, attr in enumerate(names):
        single = [PerImage(r.id, group_values(r.group)[k], r.metrics) for r in records]
        out[attr] = fairness_report(single, class_names, n_boot=n_boot, name=name)
    return out


def write_report(report: dict, records: Sequence[PerImage], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.csv`` (one row per image: id, group, per-class dice/iou/hd95)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = write_json(out_dir / "report.json", report)
    class_names = list(records[0].metrics) if records else []

    from napari_dmoe.io.cases import spreadsheet_text  # image names are the user's text: never a formula (OWASP)

    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["id", "group"] + [f"{c}_{m}" for c in class_names for m in METRICS])
            for r in records:
                cells = [r.metrics[c][m] for c in class_names for m in METRICS]
                writer.writerow([spreadsheet_text(r.id), spreadsheet_text(r.group)]
                                + ["" if math.isnan(v) else f"{v:.6g}" for v in cells])

    return json_path, atomic_write(out_dir / "report.csv", write_csv)


def write_json(path: str | Path, report: dict) -> Path:
    """A report as strict JSON (NaN -> null), written atomically."""
    text = json.dumps(_clean(report), indent=2, allow_nan=False)
    return atomic_write(path, lambda tmp: tmp.write_text(text))


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
        keys = [(m.label, k) for k, m in METRICS.items()]
        keys += [(f"ES-{METRICS[k].label}", f"es_{k}") for k in equity_metrics()] + [("worst-group Dice",
                                                                                      "worst_group_dice")]
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
