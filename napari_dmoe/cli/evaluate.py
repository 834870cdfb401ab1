"""``dmoe evaluate MODEL DATASET_CONFIG --out DIR [--split test]``: the fairness report of a model on a split.

Every case goes through ``inference.segment`` (the GUI's engine, so preprocessing and geometry are identical),
at the dataset's native resolution. Writes report.json, report.csv, violin_dice.png and, for MoE models,
expert_usage.png (mean gate weight per expert from the routing maps, averaged per group).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("evaluate", help="fairness report of a model on a dataset split",
                              description="Segment every case of a split with MODEL and write per-image and "
                              "per-group Dice/IoU/HD95, ES-Dice/ES-IoU with bootstrap CIs, and plots.")
    p.add_argument("model", metavar="MODEL", help="model file (.safetensors)")
    p.add_argument("dataset_config", metavar="DATASET_CONFIG", help="YAML config whose data section names the data")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="which split (default test)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set data.root=/data")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the 95%% CIs (default 1000)")
    p.add_argument("--name", default=None, help="method name in the report (default: the model's method)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from napari_dmoe.io.checkpoint import load_model
    from napari_dmoe.training.config import load_config

    config = load_config(args.dataset_config, args.overrides, training=False)
    model = load_model(args.model)
    name = args.name or model.spec.provenance.get("method") or Path(args.model).stem
    report = evaluate(model, config, args.split, Path(args.out), device=args.device, n_boot=args.n_boot,
                      name=name, quiet=args.quiet)
    summary = report["mean_over_classes"]
    print(f"{name}: {report['n_images']} images, Dice {summary['dice']:.4f}, ES-Dice {summary['es_dice']:.4f} "
          f"-> {Path(args.out) / 'report.json'}")
    return 0


def evaluate(model: Any, config: dict, split: str, out: Path, device: str = "auto", n_boot: int = 1000,
             name: str | None = None, quiet: bool = True) -> dict:
    """Run the model on every case of ``split``; write the report files to ``out``; return the report."""
    import numpy as np

    from napari_dmoe.evaluation.fairness import evaluate_image, fairness_report, plot_expert_usage, plot_violins, write_report
    from napari_dmoe.inference.engine import segment
    from napari_dmoe.training.data import make_dataset

    spec = model.spec
    # The model decides vocabulary and classes, so groups and router indices match what it was trained with.
    config = {**config, "data": {**config["data"], "class_names": list(spec.class_names),
                                 "attributes": [{"name": a.name, "values": list(a.values)} for a in spec.attributes]}}
    ds = make_dataset(config, split, size=None)
    if len(ds) == 0:
        raise ValueError(f"the {split} split of {config['data']['root']} has no cases; check data.* in the config")
    records, usage = [], {}
    names = [a.name for a in spec.attributes]
    for i, rec in enumerate(ds.records):
        item, spacing = ds.read(i)  # the file's own grid and voxel size (None when the file states none)
        image = item["image"]
        rgb = image.shape[0] in (3, 4) and spec.spatial_dims == 2
        image = np.moveaxis(image, 0, -1) if rgb else image[0]
        seg = segment(model, image, dict(zip(names, rec.values)), spacing=spacing, device=device, rgb=rgb)
        records.append(evaluate_image(rec.id, item["group"], seg.labels, item["label"], spec.n_classes, spacing,
                                      spec.class_names))
        if seg.routing:
            mean = np.asarray(seg.routing["mean"], dtype=np.float64)
            usage.setdefault(item["group"], []).append(mean.reshape(mean.shape[0], -1).mean(axis=1))
        if not quiet:
            print(f"[{i + 1}/{len(ds)}] {rec.id} ({item['group']})", file=sys.stderr)
    foreground = list(spec.class_names[1:])
    report = fairness_report(records, foreground, n_boot=n_boot, name=name)
    if len(names) > 1:  # intersectional: also per single attribute
        from napari_dmoe.evaluation.fairness import PerImage

        report["by_attribute"] = {}
        for k, attr in enumerate(names):
            single = [PerImage(r.id, r.group.split("/")[k], r.metrics) for r in records]
            report["by_attribute"][attr] = fairness_report(single, foreground, n_boot=n_boot, name=name)
    report.update({"model": str(getattr(model, "path", "")), "split": split, "data_root": config["data"]["root"],
                   "attributes": names})
    out.mkdir(parents=True, exist_ok=True)
    write_report(report, records, out)
    plot_violins(records, foreground, out / "violin_dice.png")
    if usage:
        groups = sorted(usage)
        matrix = np.stack([np.mean(usage[g], axis=0) for g in groups])
        plot_expert_usage(matrix, groups, out / "expert_usage.png")
        report["expert_usage"] = {g: matrix[k].tolist() for k, g in enumerate(groups)}
        (out / "report.json").write_text(json.dumps(report, indent=2))
    return report
