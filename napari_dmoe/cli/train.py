"""``dmoe train CONFIG [--set k=v ...] [--events FILE|-] [--resume] [--device D] [--quiet]``.

Works unchanged under ``torchrun --nproc_per_node N`` (recipe.batch_size is the global batch).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train a model from a YAML config (baseline, MoE, dMoE, FEBS)",
        description="Train a segmentation model from a YAML config (see training/*.yaml). Continues "
        "automatically when the output folder holds a resume state. Works under torchrun.")
    p.add_argument("config", metavar="CONFIG", help="YAML training config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set recipe.lr=0.02 --set data.root=/data (YAML values)")
    p.add_argument("--events", metavar="FILE|-", default=None,
                   help="write progress as JSON lines to FILE, or to stdout with '-'")
    p.add_argument("--resume", action="store_true",
                   help="require a resume state in output_dir (resuming is automatic when one exists)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar, and no plain progress lines when stdout is not a terminal (a cluster "
                        "log); the run folder's history.jsonl and progress.png are written either way")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from napari_dmoe.training.config import load_config
    from napari_dmoe.training.engine import train

    config = load_config(args.config, args.overrides)  # every config error is reported before work starts
    command = "dmoe " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else None
    best = train(config, events=args.events, device=args.device, quiet=args.quiet, require_resume=args.resume,
                 command=command)
    if not args.quiet and args.events != "-" and os.environ.get("RANK", "0") == "0":
        print(f"best model: {best}", file=sys.stderr)
    return 0
