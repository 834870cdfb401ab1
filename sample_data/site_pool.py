#!/usr/bin/env python
"""dMoE against the baseline over several test sites at once: the mean over sites of each site's difference, for
a clinic that does not know which camera it will get.

    python sample_data/site_pool.py --runs runs/seeds/robust-mix:dmoe runs/seeds/robust-bz:baseline \
        --tests site-b site-d site-e site-f site-g site-h --out sample_data/results/seeds/site-fgh/pooled.json

The CI resamples, in every draw, the cases within each site's groups (as seed_analysis.paired does per site) and
each method's seeds once for all sites: the same trained models are scored at every site, so their seed luck is
shared. Also counted: the (site, seed) pairs where dMoE's worst group is at least the baseline's.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seed_analysis import N_BOOT, _fast, _runs_and_methods, load  # noqa: E402

METRICS = ("dice", "worst_group_dice", "es_dice")


def pooled(sites: dict[str, tuple[list[str], list[np.ndarray], list[np.ndarray]]], seed: int = 0) -> dict:
    """``sites``: test -> (groups, baseline dice per seed, dMoE dice per seed; seeds in the same order)."""
    coded = {}
    for test, (groups, base, dmoe) in sites.items():
        names = sorted(set(groups))
        codes = np.array([names.index(g) for g in groups])
        coded[test] = (codes, len(names), [np.flatnonzero(codes == k) for k in range(len(names))], base, dmoe)

    def site_diff(test: str, idx: np.ndarray | None, sd, sb) -> np.ndarray:
        codes, n, _, base, dmoe = coded[test]
        idx = np.arange(codes.size) if idx is None else idx
        fd = np.mean([_fast(codes[idx], n, dmoe[s][idx]) for s in sd], axis=0)
        fb = np.mean([_fast(codes[idx], n, base[s][idx]) for s in sb], axis=0)
        return fd - fb

    n_seeds = {len(v[3]) for v in coded.values()} | {len(v[4]) for v in coded.values()}
    if len(n_seeds) != 1:
        raise SystemExit(f"every site needs the same seeds of both methods; found counts {sorted(n_seeds)}")
    all_seeds = np.arange(n_seeds.pop())
    per_site = {t: site_diff(t, None, all_seeds, all_seeds) for t in coded}
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(N_BOOT):
        sd, sb = rng.integers(0, all_seeds.size, all_seeds.size), rng.integers(0, all_seeds.size, all_seeds.size)
        draws.append(np.mean([site_diff(t, np.concatenate([rng.choice(s, s.size) for s in c[2]]), sd, sb)
                              for t, c in coded.items()], axis=0))
    lo, hi = np.percentile(np.array(draws), [2.5, 97.5], axis=0)
    point = np.mean(list(per_site.values()), axis=0)
    pairs = {f"{t}/seed{k}": float(_fast(c[0], c[1], c[4][k])[1] - _fast(c[0], c[1], c[3][k])[1])
             for t, c in coded.items() for k in all_seeds}
    return {"sites": list(coded), "n_seeds": int(all_seeds.size),
            **{f"delta_{m}": {"value": float(point[i]), "ci95": [float(lo[i]), float(hi[i])],
                              "per_site": {t: float(d[i]) for t, d in per_site.items()}}
               for i, m in enumerate(METRICS)},
            "worst_group_delta_per_site_and_seed": pairs,
            "pairs_dmoe_at_least_baseline": f"{sum(v >= 0 for v in pairs.values())} of {len(pairs)}"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", required=True, help="runs folders (FOLDER:method as in seed_analysis.py)")
    p.add_argument("--tests", nargs="+", required=True, help="the test sites to pool")
    p.add_argument("--dataset", default="fundus")
    p.add_argument("--out", type=Path, help="write the result as JSON here")
    args = p.parse_args(argv)
    data = {}
    for runs, methods in map(_runs_and_methods, args.runs):
        data.update({k: v for k, v in load(runs / "reports").items()
                     if k[0] in args.tests and k[1] == args.dataset and (methods is None or k[2] in methods)})
    sites = {}
    for test in args.tests:
        seeds = sorted({k[3] for k in data if k[0] == test and k[2] == "baseline"}
                       & {k[3] for k in data if k[0] == test and k[2] == "dmoe"}, key=str)
        if not seeds:
            raise SystemExit(f"{test}: no baseline and dmoe reports of the same seeds under {args.runs}")
        ids, groups = data[(test, args.dataset, "baseline", seeds[0])][:2]
        if any(data[(test, args.dataset, m, s)][0] != ids for m in ("baseline", "dmoe") for s in seeds):
            raise SystemExit(f"{test}: the reports do not hold the same cases in the same order")
        sites[test] = (groups, *[[data[(test, args.dataset, m, s)][2] for s in seeds] for m in ("baseline", "dmoe")])
    result = pooled(sites)
    w = result["delta_worst_group_dice"]
    print(f"dMoE - baseline over {', '.join(result['sites'])} ({result['n_seeds']} seeds): worst group "
          f"{w['value']:+.3f} [{w['ci95'][0]:+.3f}, {w['ci95'][1]:+.3f}]; per site "
          + ", ".join(f"{t} {v:+.3f}" for t, v in w["per_site"].items())
          + f"; dMoE's worst group >= the baseline's in {result['pairs_dmoe_at_least_baseline']} (site, seed) pairs")
    if args.out is not None:
        from napari_dmoe.io.files import atomic_write_text

        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
