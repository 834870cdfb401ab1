#!/usr/bin/env python
"""Write the synthetic datasets to disk in their public formats.

    python sample_data/generate.py {fundus,skin,prostate,all} --out DIR [--n N] [--n-test N] [--seed S] [--site b]

fundus -> DIR/fairseg (FairSeg npz + train.txt/test.txt), skin -> DIR/ham10000 (HAM10000 layout),
prostate -> DIR/prostate (images/, labels/, attributes.csv). The generators live in napari_dmoe.synthetic.
--site b: a second acquisition site (fundus and prostate only). Each kind knows its own sites (FUNDUS_SITES,
PROSTATE_SITES); a site the kind lacks is refused.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from napari_dmoe.synthetic import (FUNDUS_SITES, PROSTATE_SITES, SyntheticDataError, write_fairseg, write_ham10000,
                                   write_prostate)

DEFAULTS = {"fundus": 600, "skin": 500, "prostate": 60}  # enough for small CPU demo models


def _sizes(text: str) -> list[float]:
    return [float(v) for v in text.lower().replace("x", ",").split(",") if v]


def build(kind: str, out: Path, n: int | None, n_test: int | None, seed: int, size: str | None,
          spacing: str | None, site: str = "a") -> Path:
    """Write one dataset; returns its folder."""
    n = DEFAULTS[kind] if n is None else n
    if kind == "skin" and site != "a":
        raise SyntheticDataError(f"skin has only site 'a'; --site {site} is for fundus or prostate")
    if kind == "fundus":
        side = int(_sizes(size)[0]) if size else 224
        return write_fairseg(out / "fairseg", n_train=n, n_test=200 if n_test is None else n_test, seed=seed,
                             size=side, site=site)
    if kind == "skin":
        shape = tuple(int(v) for v in _sizes(size)) if size else (150, 200)
        return write_ham10000(out / "ham10000", n=n, seed=seed, shape=shape)
    shape = tuple(int(v) for v in _sizes(size)) if size else (96, 96, 32)
    spacing_mm = tuple(_sizes(spacing)) if spacing else (2.0, 2.0, 3.0)
    return write_prostate(out / "prostate", n=n, seed=seed, shape=shape, spacing=spacing_mm, site=site)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["fundus", "skin", "prostate", "all"])
    parser.add_argument("--out", type=Path, required=True, help="output folder (created)")
    parser.add_argument("--n", type=int, default=None, help=f"samples (fundus: train) per dataset, default {DEFAULTS}")
    parser.add_argument("--n-test", type=int, default=None, help="fundus test samples (default 200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", default=None, help="fundus side (224), skin HxW (150x200), prostate XxYxZ (96x96x32)")
    parser.add_argument("--spacing", default=None, help="prostate voxel size in mm, x,y,z (2x2x3)")
    parser.add_argument("--site", choices=sorted(set(FUNDUS_SITES) | set(PROSTATE_SITES)), default="a",
                        help="acquisition site: a (the demo data), b (another scanner and clinic; fundus, prostate), "
                             "others as listed in FUNDUS_SITES / PROSTATE_SITES")
    args = parser.parse_args(argv)
    kinds = ["fundus", "skin", "prostate"] if args.kind == "all" else [args.kind]
    if args.kind == "all" and (args.size or args.spacing):
        parser.error("--size/--spacing differ per dataset; give them with one dataset kind, not 'all'")
    for kind in kinds:
        start = time.perf_counter()
        try:
            folder = build(kind, args.out, args.n, args.n_test, args.seed, args.size, args.spacing, args.site)
        except (SyntheticDataError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        seconds = round(time.perf_counter() - start, 1)
        info = {"dataset": kind, "folder": str(folder), "seed": args.seed, "site": args.site, "seconds": seconds}
        (folder / "provenance.json").write_text(json.dumps({**info, "command": " ".join(sys.argv)}, indent=2) + "\n")
        print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
