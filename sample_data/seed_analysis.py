#!/usr/bin/env python
"""Analyse the seed study (``sample_data/seed_study.py``): mean and spread over seeds, and dMoE against the baseline
on the same test cases.

Reads <runs>/reports/<test>/<dataset>-<method>-s<seed>/report.csv (per-case Dice from ``dmoe evaluate``; one or
more runs folders) and writes to sample_data/results/seeds/: runs.csv (one row per model and test), summary.json,
seed_study.md, seeds.png and cases.csv.gz (per-case mean Dice of every model: enough to redo the paired analysis).
``--checkpoint last`` reads the ``-last`` reports instead: each run's final weights rather than the checkpoint its
validation split chose (a sensitivity check of that choice, not the study's protocol).

Per model, as in the benchmark: Dice = mean over classes of the mean over cases; per-group Dice likewise; worst
group = the lowest; ES-Dice = mean over classes of FairSeg's ES-Dice (napari_dmoe.evaluation.metrics). Across seeds:
mean and sample standard deviation. Paired comparison (dMoE - baseline): per case, the seed-mean Dice of dMoE minus
that of the baseline; the CIs resample cases (within each group, so rare groups stay present) and, independently
for each method, seeds; the statistic is the difference of the methods' seed-averaged metrics.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import re
import sys
from pathlib import Path

import numpy as np

from napari_dmoe.evaluation.metrics import PerImage, equity_scaled, group_means

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling module, also when loaded by file path
from seed_goals import goals, goals_markdown, old_new_markdown  # noqa: E402
from seed_plot import plot  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NAME = re.compile(r"^(?P<dataset>[a-z]+)-(?P<method>[a-z]+)-(?:s(?P<seed>\d+)|(?P<shipped>shipped))"
                  r"(?:-(?P<ck>last|ema|zoom1|zoom|fov))?$")
N_BOOT = 2000
# (method, reference): dMoE against the baseline is the study's question; against MoE (same experts, one router) it
# asks whether the attribute routing, not the capacity, makes the difference
CONTRASTS = [("dmoe", "baseline"), ("dmoe", "moe"), ("moe", "baseline"), ("febs", "baseline")]
METHOD_NAMES = ("baseline", "febs", "moe", "dmoe")  # the study's methods, reference first
# a run's validation-chosen weights, its final ones, their moving average; "zoom1"/"zoom": the validation-chosen
# weights with each set's site calibration of one or two rounds (site_zoom.py)
CHECKPOINTS = ("best", "last", "ema", "zoom1", "zoom", "fov")  # fov: zoomed by the camera's 1 / fov


def load(reports: Path, checkpoint: str = "best") -> dict:
    """(test, dataset, method, seed or 'shipped') -> (ids, groups, dice[case, class], class names)."""
    out = {}
    for path in sorted(reports.glob("*/*/report.csv")):
        m = NAME.match(path.parent.name)
        if not m or (m["ck"] or "best") != checkpoint:
            continue
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        classes = [c[:-5] for c in rows[0] if c.endswith("_dice")]
        dice = np.array([[float(r[f"{c}_dice"]) for c in classes] for r in rows])
        key = (path.parent.parent.name, m["dataset"], m["method"], "shipped" if m["shipped"] else int(m["seed"]))
        out[key] = ([r["id"] for r in rows], [r["group"] for r in rows], dice, classes)
    return out


def metrics(groups: list[str], dice: np.ndarray, classes: list[str]) -> dict:
    """Dice, per-group Dice, worst group and ES-Dice of one model (the report's conventions, via the project code)."""
    records = [PerImage(str(i), g, {c: {"dice": float(d[k])} for k, c in enumerate(classes)})
               for i, (g, d) in enumerate(zip(groups, dice))]
    per_class = [group_means(records, c) for c in classes]
    by_group = {g: float(np.mean([pc[g] for pc in per_class])) for g in per_class[0]}
    overall = dice.mean(axis=0)
    worst = min(by_group, key=by_group.get)
    return {"dice": float(overall.mean()), "groups": by_group, "worst_group": worst,
            "worst_group_dice": by_group[worst],
            "es_dice": float(np.mean([equity_scaled(float(overall[k]), pc) for k, pc in enumerate(per_class)]))}


def _fast(codes: np.ndarray, n_groups: int, dice: np.ndarray) -> tuple[float, float, float]:
    """(Dice, worst-group Dice, ES-Dice) of one model on a resample (``codes`` group index per case)."""
    overall = dice.mean(axis=0)
    counts = np.bincount(codes, minlength=n_groups)[:, None]
    sums = np.zeros((n_groups, dice.shape[1]))
    np.add.at(sums, codes, dice)
    gm = sums / counts
    es = np.mean([equity_scaled(float(overall[k]), gm[:, k].tolist()) for k in range(dice.shape[1])])
    return float(overall.mean()), float(gm.mean(axis=1).min()), float(es)


def paired(base: list[np.ndarray], dmoe: list[np.ndarray], groups: list[str], seed: int = 0) -> dict:
    """A method minus its reference on the same cases (named for the main contrast, dMoE - baseline); ``base``/
    ``dmoe``: one dice[case, class] array per seed."""
    names = sorted(set(groups))
    codes = np.array([names.index(g) for g in groups])
    per_case = np.mean([d.mean(axis=1) for d in dmoe], axis=0) - np.mean([b.mean(axis=1) for b in base], axis=0)
    rng = np.random.default_rng(seed)
    strata = [np.flatnonzero(codes == k) for k in range(len(names))]
    point = [np.mean([_fast(codes, len(names), d) for d in dm]) for dm in (dmoe, base)]
    stats = []
    for _ in range(N_BOOT):
        idx = np.concatenate([rng.choice(s, s.size) for s in strata])
        sd, sb = rng.integers(0, len(dmoe), len(dmoe)), rng.integers(0, len(base), len(base))
        fd = np.mean([_fast(codes[idx], len(names), dmoe[s][idx]) for s in sd], axis=0)
        fb = np.mean([_fast(codes[idx], len(names), base[s][idx]) for s in sb], axis=0)
        stats.append(fd - fb)
    stats = np.array(stats)
    lo, hi = np.percentile(stats, [2.5, 97.5], axis=0)
    names_out = ("dice", "worst_group_dice", "es_dice")
    point_diff = np.mean([_fast(codes, len(names), d) for d in dmoe], axis=0) - \
        np.mean([_fast(codes, len(names), b) for b in base], axis=0)
    return {
        "n_cases": len(groups), "seeds": [len(base), len(dmoe)],
        "per_case": {"mean": float(per_case.mean()), "median": float(np.median(per_case)),
                     "share_improved": float((per_case > 0).mean()),
                     "by_group": {g: float(per_case[codes == k].mean()) for k, g in enumerate(names)}},
        **{f"delta_{n}": {"value": float(point_diff[k]), "ci95": [float(lo[k]), float(hi[k])]}
           for k, n in enumerate(names_out)},
        "per_seed_worst_group_delta": [float(_fast(codes, len(names), d)[1] - _fast(codes, len(names), b)[1])
                                       for d, b in zip(dmoe, base)],
    }


def load_old(path: Path) -> dict:
    """An earlier study's cases.csv.gz -> the ``load`` mapping, with one "class": each case's mean Dice over classes
    (what that file keeps). Dice and per-group Dice are linear in it, so they match the earlier study exactly;
    ES-Dice (per class in the study) is not recomputed from it."""
    with gzip.open(path, "rt", newline="") as fh:
        rows = list(csv.DictReader(fh))
    out: dict = {}
    for r in rows:
        if r["seed"] == "shipped":
            continue
        key = (r["test"], r["dataset"], r["method"], int(r["seed"]))
        ids, groups, dice = out.setdefault(key, ([], [], []))[:3]
        ids.append(r["id"]), groups.append(r["group"]), dice.append([float(r["mean_dice"])])
    return {k: (ids, groups, np.array(d), ["mean"]) for k, (ids, groups, d) in out.items()}


def old_vs_new(data: dict, old: dict) -> dict:
    """Each method's new-recipe runs against its old-recipe runs of the same seeds on the same cases (paired by
    case; CIs over cases and seeds), on the per-case mean Dice both studies keep."""
    out: dict = {}
    for test, dataset, method in sorted({k[:3] for k in data}):
        seeds = sorted(s for (t, d, m, s) in data if (t, d, m) == (test, dataset, method) and s != "shipped"
                       and (t, d, m, s) in old)
        if not seeds:
            continue
        ids, groups = data[(test, dataset, method, seeds[0])][:2]
        new = [data[(test, dataset, method, s)][2].mean(axis=1, keepdims=True) for s in seeds]
        ref = []
        for s in seeds:
            o_ids, _, o_dice, _ = old[(test, dataset, method, s)]
            pos = {i: k for k, i in enumerate(o_ids)}
            if set(pos) != set(ids):
                raise SystemExit(f"old and new {test} cases differ for {dataset}-{method}-s{s}: not the same test set")
            ref.append(o_dice[[pos[i] for i in ids]])
        result = paired(ref, new, groups)
        result.pop("delta_es_dice")  # not comparable from per-case mean Dice (see load_old)
        codes_names = sorted(set(groups))
        codes = np.array([codes_names.index(g) for g in groups])
        result["per_seed"] = {str(s): {"old": {g: float(o[codes == k].mean()) for k, g in enumerate(codes_names)},
                                       "new": {g: float(n[codes == k].mean()) for k, g in enumerate(codes_names)}}
                              for s, o, n in zip(seeds, ref, new)}
        out.setdefault(f"{dataset}/{test}", {})[method] = {"seeds_used": seeds, **result}
    return out


def summarise(data: dict) -> dict:
    out: dict = {"runs": [], "by_method": {}, "contrasts": {}, "shipped": {}}
    for (test, dataset, method, seed), (ids, groups, dice, classes) in sorted(data.items(), key=str):
        row = {"test": test, "dataset": dataset, "method": method, "seed": seed, "n": len(ids),
               **metrics(groups, dice, classes)}
        if seed == "shipped":
            out["shipped"][f"{dataset}/{test}"] = row
        else:
            out["runs"].append(row)
    order = list(METHOD_NAMES)  # tables and plots: the reference first, dMoE last
    out["runs"].sort(key=lambda r: (r["test"], r["dataset"],
                                    order.index(r["method"]) if r["method"] in order else len(order), str(r["seed"])))
    for row in out["runs"]:
        out["by_method"].setdefault(f"{row['dataset']}/{row['test']}", {}).setdefault(row["method"], []).append(row)
    site_a_first = lambda kv: (kv[0].split("/")[0], kv[0].split("/")[1] != "test-a")  # noqa: E731
    out["by_method"] = dict(sorted(out["by_method"].items(), key=site_a_first))
    out["shipped"] = dict(sorted(out["shipped"].items(), key=site_a_first))
    for key, by_method in out["by_method"].items():
        for method, rows in by_method.items():
            agg = {"seeds": [r["seed"] for r in rows]}
            for k in ("dice", "worst_group_dice", "es_dice"):
                v = np.array([r[k] for r in rows])
                agg[k] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else None,
                          "values": v.round(4).tolist()}
            values = {g: np.array([r["groups"][g] for r in rows]) for g in rows[0]["groups"]}
            agg["groups"] = {g: {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else None}
                             for g, v in values.items()}
            agg["worst_groups"] = [r["worst_group"] for r in rows]
            by_method[method] = agg
        test, dataset = key.split("/")[1], key.split("/")[0]
        for method, ref in CONTRASTS:
            seeds = sorted(set(by_method.get(ref, {}).get("seeds", []))
                           & set(by_method.get(method, {}).get("seeds", [])))
            if not seeds:
                continue
            ids, groups = data[(test, dataset, ref, seeds[0])][:2]
            for s in seeds:  # the same cases in the same order for every model
                assert data[(test, dataset, method, s)][0] == ids
            out["contrasts"].setdefault(key, {})[f"{method}-{ref}"] = {"seeds_used": seeds, **paired(
                [data[(test, dataset, ref, s)][2] for s in seeds],
                [data[(test, dataset, method, s)][2] for s in seeds], groups)}
    return out


def _label(contrast: str) -> str:
    names = {"dmoe": "dMoE", "moe": "MoE", "febs": "FEBS", "baseline": "baseline"}
    method, ref = contrast.split("-")
    return f"{names.get(method, method)} - {names.get(ref, ref)}"


def _ms(agg: dict) -> str:
    return f"{agg['mean']:.3f} ± {agg['std']:.3f}" if agg["std"] is not None else f"{agg['mean']:.3f}"


def markdown(summary: dict, steps: dict) -> str:
    lines = []
    for key, by_method in summary["by_method"].items():
        dataset, test = key.split("/")
        groups = list(next(iter(by_method.values()))["groups"])
        n = next(r["n"] for r in summary["runs"] if f"{r['dataset']}/{r['test']}" == key)
        final = {"last": "; final weights, not the validation-chosen checkpoint",
                 "ema": "; the moving average of the weights (recipe.ema)"}.get(summary.get("checkpoint"), "")
        if summary.get("sources"):
            final += "; " + ", ".join(f"{m} {c}" for src in summary["sources"] for m, c in src["methods"].items())
        lines += [f"### {dataset}, {test} ({n} cases), mean ± sd over seeds; {steps.get(dataset, '?')} steps per run"
                  + final,
                  "", "| method | seeds | Dice | " + " | ".join(f"{g} Dice" for g in groups)
                  + " | worst-group Dice | ES-Dice |", "|---|---|---|" + "---|" * len(groups) + "---|---|"]
        for method, agg in by_method.items():
            lines.append(f"| {method} | {len(agg['seeds'])} | {_ms(agg['dice'])} | "
                         + " | ".join(_ms(agg["groups"][g]) for g in groups)
                         + f" | {_ms(agg['worst_group_dice'])} | {_ms(agg['es_dice'])} |")
        shipped = summary["shipped"].get(key)
        if shipped:
            lines.append(f"| dmoe, shipped demo model (800/1500 steps, seed 1234) | 1 | {shipped['dice']:.3f} | "
                         + " | ".join(f"{shipped['groups'][g]:.3f}" for g in groups)
                         + f" | {shipped['worst_group_dice']:.3f} | {shipped['es_dice']:.3f} |")
        for contrast, p in summary["contrasts"].get(key, {}).items():
            d = {k: p[f"delta_{k}"] for k in ("dice", "worst_group_dice", "es_dice")}
            lines += ["", f"{_label(contrast)} on the same {p['n_cases']} cases ({len(p['seeds_used'])} seed(s) each; "
                          "95 % CI over cases and seeds): " + "; ".join(f"{k} {v['value']:+.3f} [{v['ci95'][0]:+.3f}, "
                                                             f"{v['ci95'][1]:+.3f}]" for k, v in d.items())
                      + f". Per case: mean {p['per_case']['mean']:+.3f}, median {p['per_case']['median']:+.3f}, "
                        f"{100 * p['per_case']['share_improved']:.0f} % of cases better; by group "
                      + ", ".join(f"{g} {v:+.3f}" for g, v in p["per_case"]["by_group"].items())
                      + ". Worst-group difference per seed pair: "
                      + ", ".join(f"{v:+.3f}" for v in p["per_seed_worst_group_delta"]) + "."]
        lines.append("")
    lines += goals_markdown(summary.get("goals", {})) + old_new_markdown(summary.get("old_vs_new"))
    for key, s in summary["shipped"].items():
        if key not in summary["by_method"]:
            groups = list(s["groups"])
            lines += [f"### shipped {s['dataset']} dMoE model, {s['test']} ({s['n']} cases)", "",
                      "| Dice | " + " | ".join(f"{g} Dice" for g in groups) + " | worst-group Dice | ES-Dice |",
                      "|---|" + "---|" * len(groups) + "---|---|",
                      f"| {s['dice']:.3f} | " + " | ".join(f"{s['groups'][g]:.3f}" for g in groups)
                      + f" | {s['worst_group_dice']:.3f} ({s['worst_group']}) | {s['es_dice']:.3f} |", ""]
    return "\n".join(lines)


def _steps(runs: Path) -> dict:
    out = {}
    for events in runs.glob("*-s*.events.jsonl"):
        first = json.loads(events.read_text().splitlines()[0])
        out.setdefault(events.name.split("-")[0], set()).add(first.get("total_steps"))
    return {k: "/".join(str(s) for s in sorted(v)) for k, v in out.items()}


def _runs_and_methods(text: str) -> tuple[Path, dict[str, str | None] | None]:
    """"runs/x:dmoe@ema,moe" -> (runs/x, {dmoe: "ema", moe: None}): those methods, each with its checkpoint (None:
    ``--checkpoint``'s); a colon that is part of the path (C:/...) is left alone."""
    folder, _, tail = text.rpartition(":")
    methods = dict((m, c or None) for m, _, c in (item.partition("@") for item in tail.split(",")))
    if folder and all(m in METHOD_NAMES for m in methods) and all(c in (None, *CHECKPOINTS) for c in methods.values()):
        return Path(folder), methods
    return Path(text), None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", default=[str(ROOT / "runs" / "seeds")],
                   help="one or more runs folders of seed_study.py (their reports are pooled); FOLDER:dmoe,moe "
                   "takes only those methods' runs from FOLDER (each method's chosen recipe from its own study); "
                   "FOLDER:dmoe@ema takes that checkpoint of them")
    p.add_argument("--out", type=Path, default=ROOT / "sample_data" / "results" / "seeds")
    p.add_argument("--checkpoint", choices=CHECKPOINTS, default="best",
                   help="best: the checkpoint each run's validation chose (the protocol); last: the final weights; "
                   "ema: their moving average (recipe.ema); zoom1, zoom: best with each set's site calibration "
                   "(1, 2 rounds)")
    p.add_argument("--tests", nargs="+", help="only these test folders (e.g. test-a site-b, or the validation sets "
                   "val-a val-v); default every one found")
    p.add_argument("--old", type=Path, help="an earlier study's cases.csv.gz: pair each method's runs with its "
                   "runs there of the same seeds (old recipe against new)")
    args = p.parse_args(argv)
    from napari_dmoe.io.files import atomic_write, atomic_write_text

    data, steps = {}, {}
    args.runs = [_runs_and_methods(r) for r in args.runs]
    for runs, methods in args.runs:
        found = {}
        for checkpoint in sorted({c or args.checkpoint for c in (methods or {None: None}).values()}):
            found.update({k: v for k, v in load(runs / "reports", checkpoint).items()
                          if (args.tests is None or k[0] in args.tests)
                          and (methods is None or (methods.get(k[2], "-") or args.checkpoint) == checkpoint)})
        if clash := set(found) & set(data):
            raise SystemExit(f"{runs}: the same model is also in another runs folder: {sorted(clash, key=str)[0]}")
        data.update(found)
        steps.update(_steps(runs))
    if not data:
        raise SystemExit(f"no {args.checkpoint} reports under {', '.join(str(r / 'reports') for r, _ in args.runs)}: "
                         "run sample_data/seed_study.py first")
    summary = summarise(data)
    summary["checkpoint"] = args.checkpoint
    summary["sources"] = [{"runs": str(r), "methods": {m: c or args.checkpoint for m, c in methods.items()}}
                          for r, methods in args.runs if methods is not None]
    summary["steps"] = steps
    summary["goals"] = goals(summary)
    if args.old is not None:
        summary["old_vs_new"] = {"old": str(args.old.relative_to(ROOT) if args.old.is_relative_to(ROOT)
                                            else args.old), "contrasts": old_vs_new(data, load_old(args.old))}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "summary.json", json.dumps(summary, indent=1))
    text = markdown(summary, steps)
    atomic_write_text(args.out / "seed_study.md", text)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["test", "dataset", "method", "seed", "n", "dice", "worst_group", "worst_group_dice", "es_dice",
                "group_dice"])
    for r in summary["runs"] + list(summary["shipped"].values()):
        w.writerow([r["test"], r["dataset"], r["method"], r["seed"], r["n"], f"{r['dice']:.4f}", r["worst_group"],
                    f"{r['worst_group_dice']:.4f}", f"{r['es_dice']:.4f}",
                    " ".join(f"{g}={v:.4f}" for g, v in r["groups"].items())])
    atomic_write_text(args.out / "runs.csv", buf.getvalue())
    cases = io.StringIO()
    cw = csv.writer(cases)
    cw.writerow(["test", "dataset", "method", "seed", "id", "group", "mean_dice"])
    for (test, dataset, method, seed), (ids, groups, dice, _) in sorted(data.items(), key=str):
        for i, g, d in zip(ids, groups, dice.mean(axis=1)):
            cw.writerow([test, dataset, method, seed, i, g, f"{d:.4f}"])
    packed = gzip.compress(cases.getvalue().encode(), mtime=0)
    atomic_write(args.out / "cases.csv.gz", lambda tmp: tmp.write_bytes(packed))
    if summary["by_method"]:
        plot(summary, args.out / "seeds.png")
    print(text)
    parts = ["bench=seed_study"]
    for key, by_contrast in summary["contrasts"].items():
        if "dmoe-baseline" not in by_contrast:
            continue
        pr, tag = by_contrast["dmoe-baseline"], key.replace("/", "_").replace("-", "_")
        parts += [f"{tag}_seeds={len(pr['seeds_used'])}",
                  *(f"{tag}_delta_{k}={pr[f'delta_{k}']['value']:.4f} "
                    f"{tag}_delta_{k}_lo={pr[f'delta_{k}']['ci95'][0]:.4f} "
                    f"{tag}_delta_{k}_hi={pr[f'delta_{k}']['ci95'][1]:.4f}"
                    for k in ("dice", "worst_group_dice", "es_dice"))]
    print(" ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
