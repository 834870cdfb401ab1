#!/usr/bin/env python
"""The checkpoint rule of a seed study, chosen on validation data only (issue 26): for every finished run, the
worst-group Dice of its best-validation checkpoint, of its final weights and, where every run has one, of the
moving average of its weights (``recipe.ema``: ema.safetensors) on the validation-only sets (val-a, val-v;
``seed_study.py --on validation|both``); the rule with the higher mean wins; a tie goes to the final weights, then
to the average (the rules that do not hinge on a handful of validation images).

    python sample_data/checkpoint_rule.py --runs runs/seeds/robust-full --out sample_data/results/seeds/robust-recipe
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


TIES = ("last", "ema", "best")  # who wins a tie: the final weights, then the average, then the chosen checkpoint


def choose(reports: Path) -> dict:
    rows = []
    scored = {ck: load(reports, ck) for ck in ("best", "last", "ema")}
    for key in sorted(scored["best"], key=str):
        test, dataset, method, seed = key
        if test not in VALIDATION or key not in scored["last"]:
            continue
        row = {"set": test, "dataset": dataset, "method": method, "seed": seed}
        for ck in ("best", "last", "ema"):
            if key in scored[ck]:
                row[ck] = metrics(*scored[ck][key][1:])["worst_group_dice"]
        rows.append(row)
    if not rows:
        raise SystemExit(f"no best and last validation reports ({', '.join(VALIDATION)}) under {reports}")
    rules = [ck for ck in TIES if all(ck in r for r in rows)]
    mean = {ck: float(np.mean([r[ck] for r in rows])) for ck in rules}
    chosen = max(rules, key=lambda ck: (round(mean[ck], 4), -TIES.index(ck)))
    return {"rows": rows, "mean_worst_group": mean, "chosen": chosen,
            "rule": "higher mean worst-group Dice over val-a and val-v, every run; a tie (4 decimals) goes to the "
                    "final weights, then to the moving average"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    from napari_dmoe.io.files import atomic_write_text

    result = choose(args.runs / "reports")
    rules = list(result["mean_worst_group"])
    names = {"best": "best-validation checkpoint", "last": "final weights", "ema": "moving average"}
    lines = ["| set | method | seed | " + " | ".join(names[ck] for ck in rules) + " |",
             "|---|---|---|" + "---|" * len(rules)]
    lines += [f"| {r['set']} | {r['method']} | {r['seed']} | " + " | ".join(f"{r[ck]:.3f}" for ck in rules) + " |"
              for r in result["rows"]]
    lines += ["", "Mean worst-group Dice: " + ", ".join(f"{ck} {result['mean_worst_group'][ck]:.4f}" for ck in rules)
              + f": the rule keeps the **{result['chosen']}** weights."]
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "checkpoint_rule.json", json.dumps(result, indent=1))
    atomic_write_text(args.out / "checkpoint_rule.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
