#!/usr/bin/env python
"""Issue 26, seventh step: score finished seed-study runs with each set's own site calibration (``dmoe calibrate``'s
measure, ``napari_dmoe.inference.scale``): the set's images (no labels) give its zoom, then ``dmoe evaluate --zoom``.

    python sample_data/site_zoom.py --runs runs/seeds/robust-mix --method dmoe --seeds 1234 1 2 \
        --sets val-a val-v val-w val-r1 val-r2 val-r3 val-r4 val-r5 val-r6 val-r7 val-r8

The reference is each model's own foreground radius on 64 seeded images of its training data (the demo data's
train split, generator seed 0; ``trained_on.scale_record``, what ``dmoe train`` now writes into every 2D model).
``--variants fov`` evaluates the zoom a camera's own field of view gives (1 / fov; a diagnostic, not a candidate).
Each (model, set) calibration, one round and two (``inference.scale.site_zoom`` and ``refine``), goes to
RUNS/zoom/<set>/<name>.json, the reports to RUNS/reports/<set>/<name>-zoom1 and -zoom (``seed_analysis.py
--checkpoint zoom``, ``recipe_choice.py`` candidates ``NAME@zoom1``, ``NAME@zoom``). Finished reports are kept.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import seed_study  # noqa: E402

from napari_dmoe.synthetic.fundus import SITES  # noqa: E402


def site_of(test: str) -> str:
    """The generator site of a seed-study set (val-v -> "v", site-b -> "b")."""
    return {**{k: v[1] for k, v in seed_study.VAL_SEEDS.items()}, **seed_study.TEST_SITES}[test]


def _dataset(config_path: str, root: Path, split: str):
    from napari_dmoe.training.config import load_config
    from napari_dmoe.training.data import make_dataset

    config = load_config(config_path, [f"data.root={root}"], training=False)
    return make_dataset(config, split, size=None)


def calibrate(model, name: str, config_path: str, sets: list[str], seed: int) -> dict[str, dict[str, float]]:
    """Each set's zooms for ``model``, one round ("zoom1") and two ("zoom"), kept in RUNS/zoom/<set>/<name>.json
    (a kept one is read back)."""
    from napari_dmoe.inference.scale import measure, probe_zoom, refine, site_zoom
    from napari_dmoe.io.files import atomic_write_text
    from napari_dmoe.training.trained_on import case_image, scale_record

    zooms, reference = {}, None
    for test in sets:
        path = seed_study.RUNS / "zoom" / test / f"{name}.json"
        if path.is_file():
            kept = json.loads(path.read_text())
            zooms[test] = {"zoom1": kept["one_round"]["zoom"], "zoom": kept["two_rounds"]["zoom"]}
            continue
        if reference is None:
            train = _dataset(config_path, seed_study.DATA / "train" / "fairseg", "train")
            reference = scale_record(model.network, model.spec, train, seed)
        ds = _dataset(config_path, seed_study.DATA / test / "fairseg", "test")
        images = [(im, rgb) for im, _, rgb in (case_image(ds, i) for i in range(len(ds)))]
        one = site_zoom(reference["foreground_radius"], measure(model, images, device="cpu"))
        probe = probe_zoom(one)
        two = refine(one, measure(model, images, device="cpu", zoom=probe), probe)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"reference": reference, "one_round": one.to_dict(),
                                            "two_rounds": two.to_dict()}, indent=1) + "\n")
        seed_study._log(f"  {name} on {test}: zoom {one.zoom:.3f} (one round), {two.zoom:.3f} (two)")
        zooms[test] = {"zoom1": one.zoom, "zoom": two.zoom}
    return zooms


def summary(runs: list[Path], sets: list[str]) -> list[str]:
    """Markdown: each set's camera field of view beside the zooms measured there (mean over each runs folder's
    seeds, one round and two), and each variant's Spearman correlation with 1 / fov over ``sets``."""
    from scipy.stats import spearmanr

    found = {}
    for folder in runs:
        for test in sets:
            kept = [json.loads(p.read_text()) for p in sorted((folder / "zoom" / test).glob("*.json"))]
            found[folder.name, test] = {v: float(np.mean([k[key]["zoom"] for k in kept])) if kept else None
                                        for v, key in (("zoom1", "one_round"), ("zoom", "two_rounds"))}
    head = "| set | fov | 1/fov | " + " | ".join(f"{f.name} {v}" for f in runs for v in ("zoom1", "zoom")) + " |"
    rows = [head, "|" + "---|" * (3 + 2 * len(runs))]
    for test in sets:
        fov = SITES[site_of(test)]["fov"]
        cells = [f"{found[f.name, test][v]:.3f}" if found[f.name, test][v] else "-" for f in runs
                 for v in ("zoom1", "zoom")]
        rows.append(f"| {test} | {fov:.3f} | {1 / fov:.3f} | " + " | ".join(cells) + " |")
    for folder in runs:
        for v in ("zoom1", "zoom"):
            pairs = [(1 / SITES[site_of(t)]["fov"], found[folder.name, t][v]) for t in sets if found[folder.name, t][v]]
            if len(pairs) > 2:
                rho = spearmanr(*zip(*pairs)).statistic
                rows.append(f"\n{folder.name} {v}: Spearman with 1/fov {rho:+.2f} over {len(pairs)} sets")
    return rows


def worst_by_set(runs: Path, method: str, sets: list[str]) -> list[str]:
    """Markdown: each set's worst-group Dice (mean over seeds) as is and with each zoom, and the differences."""
    from seed_analysis import load, metrics

    variants = ("best", "zoom1", "zoom", "fov")
    table = {v: {} for v in variants}
    for v in variants:
        for (test, _, m, _), (_, groups, dice, classes) in load(runs / "reports", v).items():
            if m == method and test in sets:
                table[v].setdefault(test, []).append(metrics(groups, dice, classes)["worst_group_dice"])
    rows = [f"| {method} ({runs.name}) set | fov | as is | one round | two rounds | 1/fov |",
            "|---|---|---|---|---|---|"]
    for test in sets:
        cells = [f"{np.mean(table[v][test]):.3f}" if test in table[v] else "-" for v in variants]
        rows.append(f"| {test} | {SITES[site_of(test)]['fov']:.3f} | " + " | ".join(cells) + " |")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", dest="runs_all", type=Path, nargs="+", required=True)
    p.add_argument("--method", choices=["baseline", "febs", "moe", "dmoe"])
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--sets", nargs="+", required=True)
    p.add_argument("--recipe", default="robust")
    p.add_argument("--variants", nargs="+", choices=["zoom1", "zoom", "fov"], default=["zoom1", "zoom"],
                   help="which zooms to evaluate: measured in one round, in two (both are measured), or the "
                   "camera's own 1 / fov (a diagnostic: a clinic may know its camera's field of view)")
    p.add_argument("--summary", type=Path, metavar="FILE.md",
                   help="only write the measured zooms of --runs (one or more folders) beside each set's fov")
    args = p.parse_args(argv)
    if args.summary:
        from napari_dmoe.io.files import atomic_write_text

        lines = summary([Path(r) for r in args.runs_all], args.sets)
        for folder in args.runs_all:  # with --method: also each set's worst group per variant
            lines += ["", *worst_by_set(Path(folder), args.method, args.sets)] if args.method else []
        atomic_write_text(args.summary, "\n".join(lines) + "\n")
        return 0
    unknown = set(args.sets) - set(seed_study.TEST_SEEDS) - set(seed_study.VAL_SEEDS)
    if unknown:
        p.error(f"unknown sets {sorted(unknown)}")
    if not args.method or not args.seeds or len(args.runs_all) != 1:
        p.error("scoring takes one --runs folder, --method and --seeds")
    from napari_dmoe.io.checkpoint import load_model

    seed_study.RUNS, seed_study.RECIPE, seed_study.NICE = args.runs_all[0].resolve(), args.recipe, 0
    if set(args.sets) & set(seed_study.VAL_SEEDS):
        seed_study._validation_sets()
    config = f"training/{args.recipe}-fundus-{args.method}.yaml"
    for seed in args.seeds:
        name = f"fundus-{args.method}-s{seed}"
        path = seed_study.RUNS / name / "best.safetensors"
        if not seed_study._finished(name) or not path.is_file():
            raise SystemExit(f"{path}: not a finished run")
        zooms = calibrate(load_model(path), name, config, args.sets, seed)
        for test in args.sets:  # the diagnostic: the zoom a camera's stated field of view gives (1 / fov)
            zooms[test]["fov"] = 1.0 / SITES[site_of(test)]["fov"]
        for test in args.sets:
            for variant in args.variants:
                out = seed_study.RUNS / "reports" / test / f"{name}-{variant}"
                if (out / "report.csv").is_file():
                    continue
                seed_study._call(["dmoe", "evaluate", str(path), config, *seed_study._eval_args("fundus", test),
                                  "--out", str(out), "--name", args.method, "--n-boot", "200", "--quiet",
                                  "--zoom", f"{zooms[test][variant]:.4f}"], seed_study.RUNS / f"{name}.log")
    return 0


if __name__ == "__main__":
    sys.exit(main())
