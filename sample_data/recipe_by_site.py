#!/usr/bin/env python
"""Two recipes' worst-group Dice difference on every validation and test set, beside each set's camera values (a
diagnosis made after the tests were read: it informs the next plan, never a choice).

    python sample_data/recipe_by_site.py runs/seeds/robust-smooth03 runs/seeds/robust-mix \
        --out sample_data/results/seeds/recipe-choice-5/by_site.md
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipe_choice import score  # noqa: E402
from seed_study import TEST_SEEDS, TEST_SITES, VAL_SEEDS  # noqa: E402

from napari_dmoe.synthetic.fundus import CAMERA_RANGE, SITES  # noqa: E402


def worst_by_set(runs: Path, method: str = "dmoe") -> dict[str, float]:
    """Set -> worst-group Dice averaged over the seeds of ``runs``' best checkpoints (recipe_choice.score's
    figures, on every set it finds)."""
    found: dict[str, list[float]] = {}
    for key, value in score(runs, method, sets=(*TEST_SEEDS, *VAL_SEEDS))["worst_group"].items():
        found.setdefault(key.split("/")[0], []).append(value)  # key: "<set>/s<seed>"
    return {t: float(np.mean(v)) for t, v in found.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("first", type=Path, help="runs folder of the first recipe")
    p.add_argument("second", type=Path, help="runs folder of the recipe it is compared with")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    a, b = worst_by_set(args.first), worst_by_set(args.second)
    site_of = {**TEST_SITES, **{name: site for name, (_, site) in VAL_SEEDS.items()}}
    sets = sorted(set(a) & set(b) & set(site_of), key=lambda s: (SITES[site_of[s]]["fov"], s))
    factors = list(CAMERA_RANGE)
    lines = [f"{args.first.name} minus {args.second.name}, worst-group Dice (mean over seeds), sets by field of view",
             "", "| set | role | " + " | ".join(factors) + " | difference |", "|---|---|" + "---|" * (len(factors) + 1)]
    for s in sets:
        site = SITES[site_of[s]]
        lines.append(f"| {s} | {'validation' if s in VAL_SEEDS else 'test'} | "
                     + " | ".join(f"{site[f]:.3f}" for f in factors) + f" | {a[s] - b[s]:+.3f} |")
    diff = [a[s] - b[s] for s in sets]
    lines += [""] + [f"Spearman rank correlation of the difference with {f}: "
                     f"{spearmanr([SITES[site_of[s]][f] for s in sets], diff).statistic:+.2f}" for f in factors]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        from napari_dmoe.io.files import atomic_write_text

        atomic_write_text(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
