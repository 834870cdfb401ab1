"""``dmoe demo``: segment the bundled samples offline and write overlay and routing pictures."""
from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="segment the bundled samples and write overlay/routing PNGs (offline, no display needed)",
        description="Segment the bundled synthetic fundus and prostate samples with the bundled demo models and "
        "write the overlay and routing heatmap pictures as PNG files.",
    )
    parser.add_argument("--out", default="dmoe-demo-output", help="folder for the PNG files (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from napari_dmoe.cli.demo_pictures import run_demo

    files = run_demo(args.out, device=args.device)
    print("Wrote:")
    for path in files:
        print(f"  {path.resolve()}")
    return 0
