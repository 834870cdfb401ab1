#!/usr/bin/env python
"""The checkpoint rule of a seed study, chosen on validation data only (issue 26): for every finished run, the
worst-group Dice of its best-validation checkpoint and of its final weights on the validation-only sets (val-a,
val-v; ``seed_study.py --on validation|both``); the rule with the higher mean wins, a tie goes to the final weights.

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


def choose(reports: Path) -> dict:
    rows = []
    scored = {ck: load(reports, ck) for ck in ("best", "last")}
    for (test, dataset, method, seed), (ids, groups, dice, classes) in sorted(scored["best"].items(), key=str):
        if test not in VALIDATION or (test, dataset, method, seed) not in scored["last"]:
            continue
        last = scored["last"][(test, dataset, method, seed)]
        rows.append({"set": test, "dataset": dataset, "method": method, "seed": seed,
                     "best": metrics(groups, dice, classes)["worst_group_dice"],
                     "last": metrics(last[1], last[2], last[3])["worst_group_dice"]})
    if not rows:
        raise SystemExit(f"no best and last validation reports ({', '.join(VALIDATION)}) under {reports}")
    mean = {ck: float(np.mean([r[ck] for r in rows])) for ck in ("best", "last")}
    return {"rows": rows, "mean_worst_group": mean, "chosen": "best" if mean["best"] > mean["last"] else "last",
            "rule": "higher mean worst-group Dice over val-a and val-v, every run; a tie goes to the final weights"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    from napari_dmoe.io.files import atomic_write_text

    result = choose(args.runs / "reports")
    lines = ["| set | method | seed | best-validation checkpoint | final weights |", "|---|---|---|---|---|"]
    lines += [f"| {r['set']} | {r['method']} | {r['seed']} | {r['best']:.3f} | {r['last']:.3f} |" for r in result["rows"]]
    lines += ["", f"Mean worst-group Dice: best {result['mean_worst_group']['best']:.4f}, final "
                  f"{result['mean_worst_group']['last']:.4f}: the rule keeps the **{result['chosen']}** weights."]
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "checkpoint_rule.json", json.dumps(result, indent=1))
    atomic_write_text(args.out / "checkpoint_rule.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
