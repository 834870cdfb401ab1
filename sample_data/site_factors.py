#!/usr/bin/env python
"""Which of a test site's differences breaks a fundus model's group? The site (B, or D or E with ``--site``) with one
factor put back to site A's value, the images otherwise drawn from that site's own random stream (the seed study's
generator seed, seed_study.TEST_SEEDS), then each model evaluated on every variant with ``dmoe evaluate``; the
site itself is evaluated too (the same images as the seed study's test set).

    python sample_data/site_factors.py MODEL [MODEL ...] --out runs/seeds/site-factors
    python sample_data/site_factors.py MODEL [MODEL ...] --site d --out runs/seeds/site-factors-d

A diagnosis, not a test: it looks at the site's kind of shift, so a recipe changed because of it must be proven on
a site nobody has looked at. Per-group Dice per model and variant go to <out>/site_factors.md and .json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "sample_data"))
FACTORS = {  # variant suffix -> the site's parameters replaced by site A's ("": the site unchanged)
    "fov": {"fov": 1.0},
    "contrast": {"contrast": 1.0, "brightness_shift": 0.0},
    "optics": {"blur": 0.0, "noise": 0.015},
}


def _seeds() -> dict[str, int]:
    """Test site -> the seed study's generator seed for it (seed_study.TEST_SEEDS; site A is no shift)."""
    from seed_study import TEST_SEEDS, TEST_SITES

    return {TEST_SITES[t]: seed for t, seed in TEST_SEEDS.items() if TEST_SITES[t] != "a"}


def variants(site: str) -> dict[str, dict]:
    """The site itself (its test set's images) and one variant per factor."""
    return {site: {}, **{f"{site}-{k}": v for k, v in FACTORS.items()}}


def write_variants(data: Path, n: int, site: str = "b") -> None:
    from napari_dmoe.synthetic import fundus

    key, seed = fundus.site_key(site), _seeds()[site]  # the site's stream: the same draws, one factor changed
    for name, change in variants(site).items():
        if (data / name / "test.txt").is_file():
            continue
        fundus.SITES[name] = {**fundus.SITES[site], **change}
        fundus._SITE_KEY[name] = key
        fundus.write_fairseg(data / name, n_train=0, n_test=n, seed=seed, size=128, site=name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n", type=int, default=400)
    p.add_argument("--site", choices=sorted(_seeds()), default="b", help="the test site to take apart")
    args = p.parse_args(argv)
    from seed_analysis import metrics

    args.out = args.out.resolve()  # data.root is read relative to the config's folder
    data = args.out / "data"
    write_variants(data, args.n, args.site)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    rows = []
    for model in args.models:
        tag = f"{model.parent.name}-{model.stem}"
        for name in variants(args.site):
            out = args.out / "reports" / name / tag
            if not (out / "report.csv").is_file():
                subprocess.run(["dmoe", "evaluate", str(model), str(ROOT / "training/robust-fundus-dmoe.yaml"),
                                "--set", f"data.root={data / name}", "--out", str(out), "--n-boot", "10", "--quiet"],
                               check=True, env=env)
    for (variant, _, tag, _), (ids, groups, dice, classes) in sorted(_reports(args.out).items(), key=str):
        m = metrics(groups, dice, classes)
        rows.append({"variant": variant, "model": tag, "dice": m["dice"], "groups": m["groups"]})
    (args.out / "site_factors.json").write_text(json.dumps(rows, indent=1))
    groups = sorted(rows[0]["groups"])
    lines = ["| model | site | Dice | " + " | ".join(groups) + " |", "|---|---|---|" + "---|" * len(groups)]
    lines += [f"| {r['model']} | {r['variant']} | {r['dice']:.3f} | "
              + " | ".join(f"{r['groups'][g]:.3f}" for g in groups) + " |" for r in rows]
    (args.out / "site_factors.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _reports(out: Path) -> dict:
    """(variant, dataset, model tag, 0) -> (ids, groups, dice[case, class], classes) of every report."""
    import csv

    import numpy as np

    found = {}
    for path in sorted((out / "reports").glob("*/*/report.csv")):
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        classes = [c[:-5] for c in rows[0] if c.endswith("_dice")]
        dice = np.array([[float(r[f"{c}_dice"]) for c in classes] for r in rows])
        found[(path.parent.parent.name, "fundus", path.parent.name, 0)] = ([r["id"] for r in rows],
                                                                           [r["group"] for r in rows], dice, classes)
    return found


if __name__ == "__main__":
    sys.exit(main())
