"""Subcommands of the ``dmoe`` console script.

Each module here exposes ``add_parser(subparsers)``, which adds its parser and sets ``func`` (a callable taking
the parsed ``argparse.Namespace`` and returning an exit code). To add a command, add its module name below.
Modules import torch and the heavy core inside ``func`` so that ``dmoe --help`` stays fast.
"""
from __future__ import annotations

COMMANDS: list[str] = [
    "info",
    "import_official",
    "demo",
    "segment",
    "serve",
    "train", "evaluate", "compare", "calibrate",
    "finetune_compare",
]
