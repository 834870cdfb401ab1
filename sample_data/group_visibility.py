#!/usr/bin/env python
"""How visible is the patient group in the synthetic images? d' of one simple image feature between two groups.

    python sample_data/group_visibility.py [--n 60]

A blind model can only close a fairness gap the image lets it close: when the group is easy to read from the
image, an attribute-blind baseline infers it and dMoE has little to add (BENCHMARKS.md, fairness benchmark).
Features: fundus, background brightness (Black vs White); skin, the visibly pigmented area fraction (pixels 25
grey levels darker than the image median; 0-19 vs 80+). d' = |mean difference| / pooled standard deviation.
Last line: key=value.
"""
from __future__ import annotations

import argparse

import numpy as np

from napari_dmoe.synthetic import make_fundus, make_skin


def d_prime(a: np.ndarray, b: np.ndarray) -> float:
    return float(abs(a.mean() - b.mean()) / np.sqrt((a.var() + b.var()) / 2))


def fundus_brightness(race: str, n: int) -> np.ndarray:
    samples = [make_fundus(2, race, size=64, index=i) for i in range(n)]
    return np.array([s.image[s.mask == 0].mean() for s in samples])


def skin_dark_area(group: str, n: int) -> np.ndarray:
    out = []
    for i in range(n):
        grey = make_skin(7, group, (150, 200), lesion=i).image.astype(np.float32).mean(axis=2)
        out.append((grey < np.median(grey) - 25).mean())
    return np.array(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=60, help="samples per group (default 60)")
    args = parser.parse_args(argv)
    fundus = d_prime(fundus_brightness("White", args.n), fundus_brightness("Black", args.n))
    young, old = skin_dark_area("0-19", args.n), skin_dark_area("80+", args.n)
    skin = d_prime(young, old)
    print(f"fundus  background brightness, White vs Black: d' = {fundus:.2f}")
    print(f"skin    pigmented area fraction, 0-19 {young.mean():.3f} vs 80+ {old.mean():.3f}: d' = {skin:.2f}")
    print(f"fundus_brightness_dprime={fundus:.3g} skin_dark_area_dprime={skin:.3g} n={args.n}")


if __name__ == "__main__":
    main()
