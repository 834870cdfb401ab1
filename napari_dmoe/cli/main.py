"""The ``dmoe`` console script: argparse front end; the subcommands live in ``napari_dmoe.cli``."""
from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from typing import Sequence

from napari_dmoe import __version__
from napari_dmoe.cli import COMMANDS

# Commands that run networks: they choose their CPU threads (napari_dmoe.threads) and say so unless --quiet.
# info, compare and import-official read and write files only; they accept --threads and ignore it.
COMPUTE = {"segment", "train", "evaluate", "serve", "demo", "finetune-compare", "calibrate"}

# User-facing failures: bad files, bad arguments, bad configs. Anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dmoe",
        description="Distribution-aware Mixture of Experts (dMoE) segmentation: fair 2D/3D medical segmentation "
        "conditioned on patient attributes.",
    )
    parser.add_argument("--version", action="version", version=f"dmoe (napari-dmoe) {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"napari_dmoe.cli.{name}").add_parser(subparsers)
    for sub in subparsers.choices.values():
        # also accept --debug after the command; SUPPRESS keeps the top-level value when it is absent
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
        sub.add_argument("--threads", default=None, metavar="N|auto",
                         help="CPU threads for torch (default: $DMOE_THREADS, else $OMP_NUM_THREADS, else 'auto': "
                              "the cores this process may use that other work leaves free)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``dmoe`` with ``argv`` (default: the process arguments); return the exit code."""
    from napari_dmoe.threads import sample

    before = sample()  # the CPU load is measured from here to after `import torch`: no extra wait
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse exits on --help, --version and usage errors
        return exit_.code if isinstance(exit_.code, int) else 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        if args.command in COMPUTE:
            _threads(args, before)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"dmoe {args.command}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        if args.debug:
            traceback.print_exc()
        from napari_dmoe.text import clean

        # one line, whatever the message holds, and no escape sequences from a file reach the terminal
        message = " ".join(clean(str(err)).split()) or type(err).__name__
        print(f"dmoe {args.command}: error: {message}", file=sys.stderr)
        return 2


def _threads(args: argparse.Namespace, before: object) -> None:
    """Set torch's CPU threads by the one rule (napari_dmoe.threads) and log the choice (rank 0, unless quiet)."""
    import os

    from napari_dmoe.threads import apply_threads

    choice = apply_threads(args.threads, since=before)
    if not getattr(args, "quiet", False) and os.environ.get("RANK", "0") == "0":
        print(f"dmoe {args.command}: {choice.line()}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
