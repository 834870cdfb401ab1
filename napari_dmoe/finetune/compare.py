"""The fine-tune's before/after comparison: base and fine-tuned model on the validation pairs, then the final
model saved with its (shareable) provenance. Runs in its own subprocess (``dmoe finetune-compare``, started by
``process.compare_process``) so the GUI stays responsive and GPU memory goes back when it ends.

Each pair goes through ``evaluation.evaluate_cases``, the engine the user will use in the Segment widget.
"""
from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

from napari_dmoe.evaluation.loop import Case
from napari_dmoe.finetune.provenance import shareable
from napari_dmoe.model.routers import group_name, group_values


def pair_cases(csv_path: str | os.PathLike, names: list[str], split: str = "val") -> Iterator[Case]:
    """The ``split`` rows of a fine-tune ``pairs.csv`` (image, mask, one column per attribute) as cases."""
    from napari_dmoe.io.images import read_image

    csv_path = Path(csv_path)
    with open(csv_path, newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("split", "train") == split]
    for row in rows:
        image = read_image(csv_path.parent / row["image"])
        labels = read_image(csv_path.parent / row["mask"]).array
        attribute = {n: row[n] for n in names}
        yield Case(row["image"], group_name(attribute[n] for n in names), image.array, labels, attribute,
                   image.known_spacing, bool(image.meta.get("rgb")))  # resampled as the Segment widget does


def evaluate_on_pairs(model_path: str | os.PathLike, csv_path: str | os.PathLike, split: str = "val",
                      device: str = "cpu") -> dict[str, float]:
    """Mean foreground Dice per group (and "all") of a model on the ``split`` rows of a fine-tune CSV."""
    from napari_dmoe.evaluation.loop import evaluate_cases
    from napari_dmoe.evaluation.metrics import mean_dice
    from napari_dmoe.io.checkpoint import load_model

    model = load_model(model_path)
    names = [a.name for a in model.spec.attributes]
    result = evaluate_cases(model, pair_cases(csv_path, names, split), device=device, routing=False)
    per_group: dict[str, list[float]] = {}
    for record in result.records:
        dice = mean_dice(record)
        per_group.setdefault(record.group, []).append(dice)
        per_group.setdefault("all", []).append(dice)
    return {g: float(sum(v) / len(v)) for g, v in per_group.items()}


# -- every group, the uncorrected ones too ------------------------------------------------------------------
TOLERANCE = 0.01  # a Dice drop (or a mask change) beyond this is flagged
AGREEMENT_IMAGES = 8  # images per group on which base and new masks are compared


def _masks(model: Any, cases: list[Case], device: str) -> list[Any]:
    from napari_dmoe.inference.engine import segment

    return [segment(model, c.image, c.attribute if len(c.attribute) > 1 else next(iter(c.attribute.values())),
                    device=device, routing=False, rgb=c.rgb, spacing=c.spacing).labels for c in cases]


def _dice(spec: Any, pred: Any, truth: Any) -> float:
    from napari_dmoe.evaluation.metrics import evaluate_image, mean_dice

    return mean_dice(evaluate_image("", "", pred, truth, spec.n_classes, class_names=spec.class_names, hd95=False))


def _mean(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return float(sum(values) / len(values)) if values else float("nan")


def _as_group(case: Case, spec: Any, group: str) -> Case:
    """The same image, routed as ``group`` (an unlabelled stand-in when a group has no images of its own)."""
    values = dict(zip([a.name for a in spec.attributes], group_values(group)))
    return Case(case.id, group, case.image, case.label, values, case.spacing, case.rgb)


def _estimated(row: dict[str, Any], selection: Mapping[str, Any] | None) -> bool:
    """Fill ``row`` from the cross-validated estimate of its group (``training/crossval.py``), if there is one."""
    estimate = ((selection or {}).get("estimate") or {})
    group = (estimate.get("groups") or {}).get(row["group"])
    if not group:
        return False
    row.update(source=f"your cases, {selection['folds']}-fold cross-validation", n=group["n"],
               before=group["before"], after=group["after"], change=group["gain"],
               change_sd=estimate.get("sd_over_folds"), measured_on=estimate.get("measured_on"))
    return True


def unknown_row(base: Any, trained: Any, images: list[Case], device: str = "cpu") -> dict[str, Any]:
    """The attribute unknown: the engine averages every group's answer, the adapted groups' new answers included
    (a fine-tune for one group moves it by that group's share). Shown with how much its masks changed."""
    spec = base.spec
    cases = [Case(c.id, "unknown", c.image, c.label, {a.name: "unknown" for a in spec.attributes}, c.spacing, c.rgb)
             for c in images[:AGREEMENT_IMAGES]]
    row: dict[str, Any] = {"group": "unknown", "corrected": False, "flag": None, "n": 0, "before": None,
                           "after": None, "change": None,
                           "source": f"averages all {spec.n_routers} groups, adapted ones included"}
    if cases:
        old, new = _masks(base, cases, device), _masks(trained, cases, device)
        row["agreement"] = _mean([_dice(spec, n, o) for n, o in zip(new, old)])
        row["agreement_n"] = len(cases)
    return row


def group_rows(base: Any, trained: Any, val: list[Case], pairs: list[Case], reference: list[Case],
               device: str = "cpu", selection: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per group of the model (every attribute combination), corrected or not.

    Labelled Dice before/after comes from the user's held-back pairs of that group, else from the demo model's
    reference set. Groups without the user's labels also get ``agreement``: the mean Dice between the base and
    the new model's masks on that group's images (reference images, else the user's pair images routed as that
    group), which needs no labels. ``flag``: "worse" (Dice fell by more than TOLERANCE) or "changed" (a group
    nobody corrected, without labels, whose masks moved by more than TOLERANCE). With a cross-validated
    ``selection`` (the group-local default) a corrected group's before/after is its estimate, measured on the
    user's own corrected cases by models that did not train on them; a last row shows the attribute unknown."""
    from napari_dmoe.model.routers import all_groups

    spec = base.spec
    corrected = {c.group for c in pairs}
    rows = []
    for group in all_groups(spec):
        row: dict[str, Any] = {"group": group, "corrected": group in corrected, "flag": None}
        if _estimated(row, selection):
            row["flag"] = "worse" if row["change"] < -TOLERANCE else None
            rows.append(row)
            continue
        labelled = [c for c in val if c.group == group]
        row["source"] = "held-back pairs" if labelled else "reference set"
        labelled = labelled or [c for c in reference if c.group == group]
        images = ([c for c in reference if c.group == group]
                  or [_as_group(c, spec, group) for c in pairs])[:AGREEMENT_IMAGES]
        if labelled:
            b = _mean([_dice(spec, m, c.label) for m, c in zip(_masks(base, labelled, device), labelled)])
            a = _mean([_dice(spec, m, c.label) for m, c in zip(_masks(trained, labelled, device), labelled)])
            row.update(n=len(labelled), before=b, after=a, change=a - b)
            row["flag"] = "worse" if a < b - TOLERANCE else None
        else:
            row.update(source="no labels", n=0, before=None, after=None, change=None)
        if row["source"] != "held-back pairs" and images:
            old, new = _masks(base, images, device), _masks(trained, images, device)
            row["agreement"] = _mean([_dice(spec, n, o) for n, o in zip(new, old)])
            row["agreement_n"] = len(images)
            if row["flag"] is None and row["agreement"] < 1 - TOLERANCE and not labelled and not row["corrected"]:
                row["flag"] = "changed"  # a group nobody corrected, whose masks moved: better or worse, unknown
        rows.append(row)
    if spec.routing == "dmoe" and spec.n_routers > 1:
        rows.append(unknown_row(base, trained, [c for c in reference] or pairs, device))
    return rows


def compare_and_save(base: str, trained: str, csv_path: str, out_model: str, provenance: dict[str, Any],
                     device: str = "cpu") -> dict[str, Any]:
    """Evaluate base and fine-tuned models on the validation pairs, and every group (``group_rows``); save the
    fine-tuned model (atomically) with the fine-tune provenance (``shareable``: no case names or local paths) and
    the comparison in its spec; return ``{"before", "after", "groups", "flagged", "model"}``."""
    from napari_dmoe.finetune.reference_sets import reference_cases
    from napari_dmoe.io.checkpoint import load_model, save_model

    model, base_model = load_model(trained), load_model(base)
    names = [a.name for a in model.spec.attributes]
    val = list(pair_cases(csv_path, names, "val"))
    pairs = list(pair_cases(csv_path, names, "train")) + val
    selection = model.spec.provenance.get("selection")
    if selection:  # every pair trained the model: the "val" rows are not held back, the estimate speaks instead
        before, after = _estimate_means(selection)
        val = []
    else:
        before = evaluate_on_pairs(base, csv_path, device=device)
        after = evaluate_on_pairs(trained, csv_path, device=device)
    rows = group_rows(base_model, model, val, pairs, reference_cases(base), device, selection)
    flagged = [r["group"] for r in rows if r["flag"]]
    spec = model.spec
    run_dir = Path(out_model).resolve().parent
    spec.provenance = shareable({**spec.provenance, "finetune": {**provenance, "base_model": str(base)}}, run_dir)
    spec.metrics = {**spec.metrics, "finetune_validation_dice": {"before": before, "after": after},
                    "finetune_groups": rows}
    save_model(out_model, model.network, spec)
    return {"before": before, "after": after, "groups": rows, "flagged": flagged,
            "model": str(Path(out_model).resolve())}


def _estimate_means(selection: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    """Cross-validated before/after per corrected group, and "all" (weighted by cases)."""
    groups = (selection.get("estimate") or {}).get("groups") or {}
    before = {g: float(v["before"]) for g, v in groups.items()}
    after = {g: float(v["after"]) for g, v in groups.items()}
    n = sum(v["n"] for v in groups.values()) or 1
    before["all"] = sum(v["before"] * v["n"] for v in groups.values()) / n
    after["all"] = sum(v["after"] * v["n"] for v in groups.values()) / n
    return before, after


def compare_metrics(before: Mapping[str, float], after: Mapping[str, float]) -> list[tuple[str, float, float, float]]:
    """Rows ``(group, before, after, change)`` for every group in either mapping, sorted, plus "all" last
    when present. Missing values are NaN."""
    groups = sorted((set(before) | set(after)) - {"all"})
    if "all" in before or "all" in after:
        groups.append("all")
    rows = []
    for g in groups:
        b, a = float(before.get(g, math.nan)), float(after.get(g, math.nan))
        rows.append((g, b, a, a - b))
    return rows
