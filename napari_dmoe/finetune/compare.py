"""The fine-tune's before/after comparison: base and fine-tuned model on the validation pairs, then the final
model saved with its (shareable) provenance. Runs in its own subprocess (``dmoe finetune-compare``, started by
``process.compare_process``) so the GUI stays responsive and GPU memory goes back when it ends.

Each pair goes through ``evaluation.evaluate_cases``, the engine the user will use in the Segment widget.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Iterator

from napari_dmoe.evaluation.cases import Case
from napari_dmoe.finetune.provenance import shareable


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
        spacing = image.spacing if image.meta.get("spacing_known") else None  # resampled as the Segment widget does
        yield Case(row["image"], "/".join(attribute[n] for n in names), image.array, labels, attribute, spacing,
                   bool(image.meta.get("rgb")))


def evaluate_on_pairs(model_path: str | os.PathLike, csv_path: str | os.PathLike, split: str = "val",
                      device: str = "cpu") -> dict[str, float]:
    """Mean foreground Dice per group (and "all") of a model on the ``split`` rows of a fine-tune CSV."""
    from napari_dmoe.evaluation.cases import evaluate_cases
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


def compare_and_save(base: str, trained: str, csv_path: str, out_model: str, provenance: dict[str, Any],
                     device: str = "cpu") -> dict[str, Any]:
    """Evaluate base and fine-tuned models on the validation pairs; save the fine-tuned model (atomically) with
    the fine-tune provenance (``shareable``: no case names or local paths) and the after-metrics in its spec;
    return ``{"before", "after", "model"}``."""
    from napari_dmoe.io.checkpoint import load_model, save_model

    before = evaluate_on_pairs(base, csv_path, device=device)
    after = evaluate_on_pairs(trained, csv_path, device=device)
    model = load_model(trained)
    spec = model.spec
    run_dir = Path(out_model).resolve().parent
    spec.provenance = shareable({**spec.provenance, "finetune": {**provenance, "base_model": str(base)}}, run_dir)
    spec.metrics = {**spec.metrics, "finetune_validation_dice": {"before": before, "after": after}}
    save_model(out_model, model.network, spec)
    return {"before": before, "after": after, "model": str(Path(out_model).resolve())}
