#!/usr/bin/env python
"""Choose each method's recipe among seed-study candidates on the validation-only sets (issue 26), never on a test.

    python sample_data/recipe_choice.py --method dmoe --candidate robust=runs/seeds/robust-full \
        --candidate robust+drop=runs/seeds/robust-drop --out sample_data/results/seeds/recipe-choice

Rule (written down before any candidate's validation report was read; committed with this file): for every
candidate, the worst-group Dice of each seed's run (its best-validation checkpoint, the rule the checkpoint study
kept) on val-a (fresh site-A images) and on val-v (site V, a validation-only site). A candidate with a worst group
under 0.7 in any seed on either set ranks after those without; among the rest the higher mean over seeds and both
sets wins; means equal to three decimals go to the candidate listed first (list the simpler recipe first). Every
candidate must have the same seeds. The tests (test-a, site-b) are not read here. A candidate named ``NAME@ema``
(or ``@last``) is scored on those weights of its runs instead (a recipe and a checkpoint rule chosen together).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seed_analysis import load, metrics  # noqa: E402

VALIDATION = ("val-a", "val-v")
FLOOR = 0.7


def checkpoint_of(name: str) -> str:
    """The weights a candidate is scored on: ``NAME@ema`` -> "ema", a plain name -> "best"."""
    return name.rpartition("@")[2] if "@" in name else "best"


def score(runs: Path, method: str, dataset: str = "fundus", checkpoint: str = "best",
          sets: tuple[str, ...] = VALIDATION) -> dict:
    """Worst-group Dice per (set, seed) of ``method``'s runs under ``runs`` (their ``checkpoint``: best, last or
    ema) on the validation ``sets``; their mean and minimum."""
    rows = {}
    for (test, ds, m, seed), (_, groups, dice, classes) in load(runs / "reports", checkpoint).items():
        if test in sets and ds == dataset and m == method and seed != "shipped":
            rows[f"{test}/s{seed}"] = metrics(groups, dice, classes)["worst_group_dice"]
    if not rows:
        raise SystemExit(f"{runs}: no {method} reports on {', '.join(sets)}: run seed_study.py --on both")
    values = list(rows.values())
    return {"runs": str(runs), "worst_group": rows, "mean": float(np.mean(values)), "min": float(np.min(values))}


def choose(candidates: dict[str, Path], method: str, sets: tuple[str, ...] = VALIDATION) -> dict:
    scored = {name: score(path, method, checkpoint=checkpoint_of(name), sets=sets) for name, path in candidates.items()}
    keys = {name: sorted(s["worst_group"]) for name, s in scored.items()}
    if len({tuple(k) for k in keys.values()}) != 1:
        raise SystemExit(f"the candidates do not cover the same sets and seeds: {keys}")
    order = sorted(scored, key=lambda n: (scored[n]["min"] < FLOOR, -round(scored[n]["mean"], 3),
                                          list(candidates).index(n)))
    return {"method": method, "validation": list(sets), "candidates": scored, "ranking": order, "chosen": order[0],
            "rule": __doc__.split("Rule ", 1)[1].split("\n\n")[0].replace("\n", " ")}


def test_table(candidates: dict[str, Path], method: str, tests: list[str], dataset: str = "fundus") -> list[str]:
    """Markdown rows of every candidate's test figures (mean ± sd over seeds and each seed's worst group), made
    only after the choice is written: they inform the report, never the choice."""
    rows = ["| candidate | test | Dice | worst-group Dice | ES-Dice | worst group per seed |",
            "|---|---|---|---|---|---|"]
    for name, runs in candidates.items():
        found = load(runs / "reports", checkpoint_of(name))
        for test in tests:
            per_seed = {seed: metrics(*v[1:]) for (t, ds, m, seed), v in sorted(found.items(), key=str)
                        if (t, ds, m) == (test, dataset, method) and seed != "shipped"}
            if not per_seed:
                continue
            cells = [f"{np.mean([r[k] for r in per_seed.values()]):.3f} ± "
                     f"{np.std([r[k] for r in per_seed.values()], ddof=1) if len(per_seed) > 1 else 0:.3f}"
                     for k in ("dice", "worst_group_dice", "es_dice")]
            seeds = ", ".join(f"s{s} {r['worst_group_dice']:.3f} ({r['worst_group']})" for s, r in per_seed.items())
            rows.append(f"| {name} | {test} | " + " | ".join(cells) + f" | {seeds} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", required=True)
    p.add_argument("--candidate", action="append", required=True, metavar="NAME=RUNS",
                   help="a recipe's name and its seed-study runs folder (list the simplest first)")
    p.add_argument("--out", type=Path, help="write <out>/<method>.json")
    p.add_argument("--tests", nargs="+", help="after the choice is written, also write every candidate's figures on "
                   "these tests (e.g. test-a site-b) to <out>/<method>-tests.md; they do not enter the choice")
    p.add_argument("--validation", nargs="+", default=list(VALIDATION), metavar="SET",
                   help=f"the validation sets the rule reads (default {' '.join(VALIDATION)}, the committed rule's)")
    args = p.parse_args(argv)
    if not all(s.startswith("val-") for s in args.validation):
        p.error("--validation takes validation sets only (val-*); a test set never enters a choice")
    candidates = {}
    for item in args.candidate:
        name, _, path = item.partition("=")
        if not path:
            p.error(f"--candidate {item!r}: expected NAME=RUNS")
        candidates[name] = Path(path)
    result = choose(candidates, args.method, tuple(args.validation))
    for name in result["ranking"]:
        s = result["candidates"][name]
        print(f"{name:24s} mean worst group {s['mean']:.4f}  min {s['min']:.4f}  "
              + "  ".join(f"{k} {v:.3f}" for k, v in sorted(s["worst_group"].items())))
    print(f"chosen for {args.method}: {result['chosen']}")
    if args.out is not None:
        from napari_dmoe.io.files import atomic_write_text

        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out / f"{args.method}.json", json.dumps(result, indent=1))
        if args.tests:
            rows = test_table(candidates, args.method, args.tests)
            atomic_write_text(args.out / f"{args.method}-tests.md", "\n".join(rows) + "\n")
            print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
