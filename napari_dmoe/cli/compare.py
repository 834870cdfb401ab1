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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from napari_dmoe.evaluation.report import compare_reports

    paths = [Path(p) / "report.json" if Path(p).is_dir() else Path(p) for p in args.reports]
    table = compare_reports(paths)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0
