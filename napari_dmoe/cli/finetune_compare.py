"""``dmoe finetune-compare BASE TRAINED CSV OUT_MODEL``: the Fine-tune widget's before/after step.

Evaluates the base and the fine-tuned model on the ``val`` rows of the run's pairs CSV and saves the final model
with its fine-tune provenance (``finetune.compare.compare_and_save``). The widget starts it as a subprocess
(``finetune.process.compare_process``); it is a ``dmoe`` command so every entry point shares one front end.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("finetune-compare", help="before/after Dice of a fine-tune; save the final model",
                              description="Evaluate BASE and TRAINED on the val rows of CSV (a fine-tune "
                              "pairs.csv) and save TRAINED as OUT_MODEL with its fine-tune provenance.")
    p.add_argument("base", metavar="BASE", help="the model the fine-tune started from")
    p.add_argument("trained", metavar="TRAINED", help="the fine-tuned model (the run's best.safetensors)")
    p.add_argument("csv", metavar="CSV", help="the run's pairs.csv (image, mask, attributes, split)")
    p.add_argument("out_model", metavar="OUT_MODEL", help="where to save the final model")
    p.add_argument("--provenance", metavar="FILE", help="JSON file with the fine-tune provenance")
    p.add_argument("--out", default="compare.json", metavar="FILE", help="the before/after result (JSON)")
    p.add_argument("--device", default="cpu", help="cpu (default), auto, cuda, cuda:N or mps")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT_MODEL and --out if they exist (never an input: BASE, TRAINED, CSV)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from napari_dmoe.finetune.compare import compare_and_save
    from napari_dmoe.io.files import atomic_write
    from napari_dmoe.io.outputs import check_single

    inputs = [Path(p) for p in (args.base, args.trained, args.csv, args.provenance) if p]
    # before any work: neither output may be an input or replace a file without --overwrite (issue 28)
    check_single([Path(args.out_model), Path(args.out)], inputs, getattr(args, "overwrite", False))
    if not str(args.out_model).endswith(".safetensors"):
        raise ValueError(f"OUT_MODEL {args.out_model}: model files end in .safetensors")
    check_pairs_csv(Path(args.csv), args.trained)
    prov = json.loads(Path(args.provenance).read_text(encoding="utf-8")) if args.provenance else {}
    result = compare_and_save(args.base, args.trained, args.csv, args.out_model, prov, args.device)
    text = json.dumps(result, indent=1)
    atomic_write(args.out, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return 0


def check_pairs_csv(path: Path, model: str) -> None:
    """The pairs CSV has the columns the comparison reads (image, mask, split, the model's attributes) and every
    row its image and mask cells; refused naming the file, line and column (not a KeyError after a model ran)."""
    import csv

    from napari_dmoe.io.checkpoint import read_spec

    names = [a.name for a in read_spec(model).attributes]
    if not path.is_file():
        raise FileNotFoundError(f"CSV {path} does not exist")
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            columns = reader.fieldnames or []
            missing = [c for c in ("image", "mask", *names) if c not in columns]
            if missing:
                raise ValueError(f"{path}: no column {', '.join(map(repr, missing))} (columns: {columns}); a fine-tune "
                                 "pairs CSV has image, mask, one column per attribute and split")
            for line, row in enumerate(reader, start=2):
                for column in ("image", "mask"):
                    if not (row.get(column) or "").strip():
                        raise ValueError(f"{path}, line {line}: the {column!r} cell is empty; fill it or remove "
                                         "the row")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a UTF-8 text CSV ({err.reason})") from None
