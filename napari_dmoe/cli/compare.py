"""``dmoe compare REPORT...``: several fairness reports (report.json) side by side, as a Markdown table."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("compare", help="side-by-side table of several fairness reports",
                              description="Print Dice, IoU, HD95, ES-Dice, ES-IoU and per-group Dice of several "
                              "report.json files (from dmoe evaluate) as one Markdown table.")
    p.add_argument("reports", nargs="+", metavar="REPORT", help="report.json files, or folders holding one")
    p.add_argument("--out", default=None, metavar="FILE", help="also write the table to FILE")
    p.add_argument("--overwrite", action="store_true", help="replace FILE when it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from napari_dmoe.evaluation.report import compare_reports

    from napari_dmoe.io.files import atomic_write_text
    from napari_dmoe.io.outputs import check_single

    paths = [Path(p) / "report.json" if Path(p).is_dir() else Path(p) for p in args.reports]
    if args.out:  # before any work: the table must never replace one of the reports it reads
        check_single([Path(args.out)], paths, args.overwrite)
    table = compare_reports(paths)
    print(table)
    if args.out:
        atomic_write_text(args.out, table + "\n")
    return 0
