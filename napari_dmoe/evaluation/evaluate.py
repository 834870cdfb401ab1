"""What ``dmoe evaluate`` writes: the fairness report of a model on a dataset split, its table and its plots.

Every case goes through ``evaluate_cases`` (the inference engine, at the dataset's native resolution). Writes
report.json, report.csv, violin_dice.png and, for MoE models, expert_usage.png (mean gate weight per expert from
the routing maps, averaged per group).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from napari_dmoe.evaluation.cases import dataset_cases, evaluate_cases
from napari_dmoe.evaluation.report import by_attribute, fairness_report, write_report


def evaluate_dataset(model: Any, ds: Any, out: str | Path, *, device: str = "auto", n_boot: int = 1000,
                     name: str | None = None, quiet: bool = True, extra: dict[str, Any] | None = None) -> dict:
    """Evaluate ``model`` on every case of ``ds`` (a ``datasets`` dataset whose vocabulary is the model's);
    write the report files to ``out``; return the report (``extra`` keys are added to it)."""
    from napari_dmoe.evaluation.plots import plot_expert_usage, plot_violins

    spec, out = model.spec, Path(out)
    names = [a.name for a in spec.attributes]

    def progress(index: int, case: Any) -> None:
        if not quiet:
            print(f"[{index + 1}/{len(ds)}] {case.id} ({case.group})", file=sys.stderr)

    result = evaluate_cases(model, dataset_cases(ds), device=device, progress=progress)
    foreground = list(spec.class_names[1:])
    report = fairness_report(result.records, foreground, n_boot=n_boot, name=name)
    if len(names) > 1:  # intersectional: also per single attribute
        report["by_attribute"] = by_attribute(result.records, names, foreground, n_boot=n_boot, name=name)
    report.update({"model": str(getattr(model, "path", "")), **(extra or {}), "attributes": names})
    out.mkdir(parents=True, exist_ok=True)
    usage = result.usage_matrix()
    if usage is not None:
        groups, matrix = usage
        report["expert_usage"] = {g: matrix[k].tolist() for k, g in enumerate(groups)}
    write_report(report, result.records, out)
    plot_violins(result.records, foreground, out / "violin_dice.png")
    if usage is not None:
        plot_expert_usage(matrix, groups, out / "expert_usage.png")
    return report
