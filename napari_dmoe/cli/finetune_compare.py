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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from napari_dmoe.finetune.compare import compare_and_save
    from napari_dmoe.io.files import atomic_write

    prov = json.loads(Path(args.provenance).read_text(encoding="utf-8")) if args.provenance else {}
    result = compare_and_save(args.base, args.trained, args.csv, args.out_model, prov, args.device)
    text = json.dumps(result, indent=1)
    atomic_write(args.out, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return 0
