"""``dmoe evaluate MODEL DATASET_CONFIG --out DIR [--split test]``: the fairness report of a model on a split.

The work is ``evaluation.evaluate.evaluate_dataset`` (every case through the inference engine, the GUI's).
"""
from __future__ import annotations

import argparse
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
    p.add_argument("--zoom", type=float, default=1.0, metavar="Z",
                   help="segment every case zoomed by Z about its centre (2D models; see `dmoe segment --zoom`; "
                   "default 1: as the images are)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier report in --out (never an input: the model, the config, the data's tables)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from napari_dmoe.io.checkpoint import load_model
    from napari_dmoe.training.config import load_config

    from napari_dmoe.inference.scale import check_zoom

    config = load_config(args.dataset_config, args.overrides, training=False)
    check_report_outputs(Path(args.out), args, config)  # before the model loads: a refusal costs nothing
    model = load_model(args.model)
    zoom = check_zoom(args.zoom, model.spec.spatial_dims)
    name = args.name or model.spec.provenance.get("method") or Path(args.model).stem
    report = evaluate(model, config, args.split, Path(args.out), device=args.device, n_boot=args.n_boot,
                      name=name, quiet=args.quiet, zoom=zoom)
    if not report:  # torchrun: a process other than rank 0, which writes and reports
        return 0
    summary = report["mean_over_classes"]
    print(f"{name}: {report['n_images']} images, Dice {summary['dice']:.4f}, ES-Dice {summary['es_dice']:.4f} "
          f"-> {Path(args.out) / 'report.json'}")
    return 0


REPORT_FILES = ("report.json", "report.csv", "violin_dice.png", "expert_usage.png")  # evaluation.evaluate writes


def check_report_outputs(out: Path, args: argparse.Namespace, config: dict) -> None:
    """The report files may not replace an input (the model, the config, a table the dataset reads) nor, without
    ``--overwrite``, an earlier report: one output policy for every verb (``io.outputs``)."""
    from napari_dmoe.io.outputs import OutputError, check_single

    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; give a folder for the report")
    data = config["data"]
    root = Path(data["root"])
    tables = [root / data[k] for k in ("csv", "train_list", "test_list") if data.get(k)]
    tables += [root / "attributes.csv", root / "HAM10000_metadata.csv"]
    check_single([out / name for name in REPORT_FILES], [Path(args.model), Path(args.dataset_config), *tables],
                 getattr(args, "overwrite", False), what="report file")


def evaluate(model: Any, config: dict, split: str, out: Path, device: str = "auto", n_boot: int = 1000,
             name: str | None = None, quiet: bool = True, zoom: float = 1.0) -> dict:
    """The ``split`` of the config's dataset, read with the model's vocabulary and classes, evaluated."""
    from napari_dmoe.evaluation.evaluate import evaluate_dataset
    from napari_dmoe.training.data import make_dataset

    spec = model.spec
    # The model decides vocabulary and classes, so groups and router indices match what it was trained with.
    config = {**config, "data": {**config["data"], "class_names": list(spec.class_names),
                                 "attributes": [{"name": a.name, "values": list(a.values)} for a in spec.attributes]}}
    ds = make_dataset(config, split, size=None)
    if len(ds) == 0:
        raise ValueError(f"the {split} split of {config['data']['root']} has no cases; check data.* in the config")
    return evaluate_dataset(model, ds, out, device=device, n_boot=n_boot, name=name, quiet=quiet,
                            extra={"split": split, "data_root": config["data"]["root"]}, zoom=zoom)
