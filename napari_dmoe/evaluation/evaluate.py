"""What ``dmoe evaluate`` writes: the fairness report of a model on a dataset split, its table and its plots.

Every case goes through ``evaluate_cases`` (the inference engine, at the dataset's native resolution). Writes
report.json, report.csv, violin_dice.png and, for MoE models, expert_usage.png (mean gate weight per expert from
the routing maps, averaged per group).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from napari_dmoe.evaluation.loop import Evaluation, dataset_cases, evaluate_cases
from napari_dmoe.evaluation.report import by_attribute, fairness_report, write_report


def evaluate_dataset(model: Any, ds: Any, out: str | Path, *, device: str = "auto", n_boot: int = 1000,
                     name: str | None = None, quiet: bool = True, extra: dict[str, Any] | None = None,
                     zoom: float = 1.0) -> dict:
    """Evaluate ``model`` on every case of ``ds`` (a ``datasets`` dataset whose vocabulary is the model's);
    write the report files to ``out``; return the report (``extra`` keys are added to it). Under torchrun the
    cases are spread over the processes; rank 0 writes and returns the report, the others return ``{}``.
    ``zoom``: every case segmented with that site calibration (``inference.scale``)."""
    from napari_dmoe.evaluation.plots import plot_expert_usage, plot_violins

    spec, out = model.spec, Path(out)
    names = [a.name for a in spec.attributes]

    result = evaluate_sharded(model, ds, device=device, quiet=quiet, resume_dir=out / "cases", zoom=zoom)
    if result is None:  # a torchrun process other than rank 0: rank 0 has every record and writes the report
        return {}
    foreground = list(spec.class_names[1:])
    report = fairness_report(result.records, foreground, n_boot=n_boot, name=name)
    if len(names) > 1:  # intersectional: also per single attribute
        report["by_attribute"] = by_attribute(result.records, names, foreground, n_boot=n_boot, name=name)
    report.update({"model": str(getattr(model, "path", "")), **(extra or {}), "attributes": names})
    if zoom != 1.0:
        report["zoom"] = zoom
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


def evaluate_sharded(model: Any, ds: Any, *, device: str = "auto", quiet: bool = True,
                     resume_dir: str | Path | None = None, zoom: float = 1.0) -> Evaluation | None:
    """``evaluate_cases`` over every case of ``ds``, spread over the torchrun processes (``napari_dmoe.sharding``;
    one process without torchrun). Rank 0 gets the records and expert usage merged in case order, exactly what
    one process makes, so the bootstrap that follows sees the same list; the other ranks get None. Cases that
    fail are all listed in one error (a report without them would not be the split's). With ``resume_dir`` each
    finished case is kept there (``evaluation.resume``) and a rerun skips the cases kept for this model."""
    from napari_dmoe.evaluation.resume import CaseStore
    from napari_dmoe.sharding import processes, run_batch

    store = CaseStore(resume_dir, model, ds, zoom) if resume_dir is not None else None

    with processes(device) as info:
        def work(index: int) -> Evaluation:
            case = next(dataset_cases(ds, [index]))
            evaluation = evaluate_cases(model, [case], device=str(info.device), zoom=zoom)
            if store is not None:
                store.put(index, evaluation)
            if not quiet and not info.enabled:  # one process: a line per case (rank 0 counts for several)
                print(f"[{index + 1}/{len(ds)}] {case.id} ({case.group})", file=sys.stderr)
            return evaluation

        outcome = run_batch(len(ds), work, info, what="cases", stream=None if quiet else sys.stderr, every_s=10.0,
                            done=None if store is None else lambda i: store.get(i) is not None)
    if outcome.failed:
        listed = "; ".join(f"{ds.records[i].id}: {message}" for i, message in outcome.failures[:10])
        raise ValueError(f"{outcome.failed} of {len(ds)} cases failed, no report written"
                         + (f": {listed}" if listed else " (rank 0 lists them)"))
    if not info.is_main:
        return None
    merged, ran = Evaluation(), dict(outcome.results)
    for index in range(len(ds)):  # case order; the cases a killed run finished come from its records
        evaluation = ran[index] if index in ran else store.get(index)
        merged.records += evaluation.records
        for group, rows in evaluation.usage.items():
            merged.usage.setdefault(group, []).extend(rows)
    return merged
