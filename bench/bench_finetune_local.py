"""Human-in-the-loop fine-tune at a new site: does the corrected group gain, and do the other groups stay put?

The bundled fundus demo model (trained on synthetic site "a") meets a new site (``--site``: "c", where the demo
model's rare group starts more than 0.2 Dice below the best group, or "b"; ``napari_dmoe.synthetic.fundus.SITES``).
A user corrects N cases of the rare group (Black) and fine-tunes the way the Fine-tune widget does it: its export
(``finetune.prepare.export_pairs``), its config (``build_config``) with its CPU defaults (``default_settings``), the
one training engine. Modes: ``group_local`` (the widget's default: only the Black router and its private expert
copy; k-fold cross-validation over every corrected case picks the steps or keeps the base), ``all`` and
``routers_experts``. Per-group mean foreground Dice on held-out cases of every group of that site, before and
after, the gain, the estimate the widget shows (cross-validated on the N corrected cases), whether the base was
kept, and the training wall and CPU time; ``--repeats`` draws of the corrected cases give the spread. For
group_local it also checks that the other groups' class probabilities are bitwise the base model's.
``--validation`` draws corrected and held-out cases from other seeds: settings are chosen there, never on the
reporting draws. ``--set KEY=VALUE`` changes the written config (e.g. ``recipe.lr=0.03``).

    nice -n 10 python bench/bench_finetune_local.py --quick         # 1 repeat, N=5, 4 steps (checks the script)
    OMP_NUM_THREADS=1 python bench/bench_finetune_local.py --site c --n 5 10 20 --repeats 5 --threads 1
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _util import machine, summary, table  # noqa: E402

RARE = "Black"
GROUPS = ("Asian", "Black", "White")
ATTRIBUTE, KIND = "race", "fundus"  # --kind prostate: the 3D demo model, its rare stage T1, site c's prostate CT


def _use_prostate() -> None:
    global RARE, GROUPS, ATTRIBUTE, KIND
    from napari_dmoe.synthetic import STAGES

    RARE, GROUPS, ATTRIBUTE, KIND = "T1", tuple(STAGES), "stage", "prostate"
MODES = ("all", "routers_experts", "group_local")


def _pairs(seed: int, race: str, n: int, size: int, site: str) -> list:
    from napari_dmoe.finetune.prepare import TrainingPair
    from napari_dmoe.synthetic import make_fundus

    out = []
    if KIND == "prostate":
        from napari_dmoe.synthetic import make_prostate

        for i in range(n):
            image, label, spacing = make_prostate(seed, race, index=i, site=site).napari_order()
            out.append(TrainingPair(f"{race}{seed}_{i}", image, label, {"stage": race}, spacing=spacing))
        return out
    for i in range(n):
        s = make_fundus(seed, race=race, size=size, index=i, site=site)
        out.append(TrainingPair(f"{race}{seed}_{i}", s.image, s.classes, {"race": race}))
    return out


def _heldout_csv(folder: Path, spec, n_per_group: int, size: int, site: str, seed_base: int = 9000) -> Path:
    """Held-out cases of every group of ``site``, as a pairs CSV whose rows are all split "test"."""
    import csv

    from napari_dmoe.finetune.prepare import export_pairs

    pairs = [p for g in GROUPS for p in _pairs(seed_base + GROUPS.index(g), g, n_per_group, size, site)]
    export = export_pairs(pairs, folder, spec, [True] * len(pairs))
    rows = list(csv.DictReader(open(export.csv_path, newline="")))
    for row in rows:
        row["split"] = "test"
    with open(export.csv_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return export.csv_path


def _bitwise_others(base, tuned, heldout: Path) -> bool:
    """The non-corrected groups' class probabilities: identical arrays from the base and the tuned model."""
    from napari_dmoe.finetune.compare import pair_cases
    from napari_dmoe.inference.engine import segment

    for case in pair_cases(heldout, [ATTRIBUTE], split="test"):
        if case.group == RARE:
            continue
        a = segment(base, case.image, case.attribute[ATTRIBUTE], routing=False, spacing=case.spacing).probabilities
        b = segment(tuned, case.image, case.attribute[ATTRIBUTE], routing=False, spacing=case.spacing).probabilities
        if not np.array_equal(a, b):
            return False
    return True


def _one_run(base_path: Path, spec, mode: str, n: int, repeat: int, args, work: Path) -> tuple[Path, float, float]:
    """Export N corrected rare-group cases like the widget, fine-tune with its config; (model, wall s, CPU s)."""
    import torch

    from napari_dmoe.finetune.prepare import (build_config, default_settings, export_pairs, free_memory,
                                              split_validation, write_config)
    from napari_dmoe.training.config import apply_overrides, load_config
    from napari_dmoe.training.engine import train

    run = work / f"{mode}-n{n}-r{repeat}"
    pairs = _pairs((300 if args.validation else 100) + repeat, RARE, n, args.size, args.site)
    export = export_pairs(pairs, run / "data", spec, split_validation(n, 0.2, seed=repeat))
    settings = default_settings("cpu", free_memory("cpu"), spec.spatial_dims, trainable=mode)
    for key in ("local_experts", "steps", "lr", "folds"):
        if getattr(args, key) is not None:
            setattr(settings, key, getattr(args, key))
    config = build_config(base_path, spec, export, run / "train", settings)
    path = write_config(apply_overrides(config, args.set), run / "finetune.yaml")
    torch.set_num_threads(args.threads)
    t0, c0 = time.perf_counter(), time.process_time()
    best = train(load_config(path), quiet=True, device="cpu")
    return best, time.perf_counter() - t0, time.process_time() - c0


def _plot(results: list[dict], out: Path) -> None:
    """One panel per site: the corrected group's gain on held-out cases per draw (dots), its median (line), the
    widget's cross-validated estimate (open circles) and the other groups' largest change (grey crosses)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = sorted({r.get("site", "b") for r in results})
    fig, axes = plt.subplots(1, len(sites), figsize=(5.5 * len(sites), 3.8), sharey=True, squeeze=False)
    for ax, site in zip(axes[0], sites):
        rs = [r for r in results if r.get("site", "b") == site and r["mode"] == "group_local"]
        ns = sorted({r["n"] for r in rs})
        for i, n in enumerate(ns):
            gains = [r["gain"][RARE] for r in rs if r["n"] == n]
            x = [n + 0.35 * (j - (len(gains) - 1) / 2) for j in range(len(gains))]
            ax.plot(x, gains, "o", color="C0", label="held-out gain (per draw)" if i == 0 else None)
            est = [r.get("cv_estimate") for r in rs if r["n"] == n]
            ax.plot([xx for xx, e in zip(x, est) if e is not None], [e for e in est if e is not None], "o",
                    mfc="none", color="C1", label="cross-validated estimate shown" if i == 0 else None)
            others = [max(abs(r["gain"][g]) for g in GROUPS if g != RARE) for r in rs if r["n"] == n]
            ax.plot(x, others, "x", color="grey", label="other groups, largest |change|" if i == 0 else None)
        if ns:
            ax.plot(ns, [statistics.median(r["gain"][RARE] for r in rs if r["n"] == n) for n in ns], "-",
                    color="C0", label="median")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_title(f"site {site}: {RARE} (corrected)")
        ax.set_xlabel("corrected cases N")
        ax.set_xticks(ns)
    axes[0][0].set_ylabel("Dice gain on held-out cases")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Group-local fine-tune, widget defaults (one dot per draw of corrected cases)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def _median_range(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:+.3f}"
    return f"{statistics.median(values):+.3f} ({min(values):+.3f} .. {max(values):+.3f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 repeat, N=5, 4 steps, 3 held-out cases per group")
    parser.add_argument("--n", type=int, nargs="+", default=[5, 10, 20], help="corrected cases of the rare group")
    parser.add_argument("--modes", nargs="+", default=["group_local"], choices=MODES)
    parser.add_argument("--kind", default="fundus", choices=("fundus", "prostate"),
                        help="prostate: the 3D demo model and its rare stage T1 (use e.g. --heldout 4)")
    parser.add_argument("--site", default="c", help="the new site (napari_dmoe.synthetic.fundus.SITES)")
    parser.add_argument("--folds", type=int, default=None, help="group_local cross-validation folds (0: off)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="change the written config, e.g. recipe.lr=0.03 (repeatable)")
    parser.add_argument("--repeats", type=int, default=3, help="draws of the corrected cases (spread)")
    parser.add_argument("--first-repeat", type=int, default=0, help="index of the first draw (split a run)")
    parser.add_argument("--heldout", type=int, default=12, help="held-out cases per group")
    parser.add_argument("--steps", type=int, default=None, help="default: the widget's CPU default")
    parser.add_argument("--lr", type=float, default=None, help="default: the widget's CPU default")
    parser.add_argument("--local-experts", type=int, default=None, help="default: the widget's default")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--validation", action="store_true",
                        help="choose settings: other draws of corrected cases and other held-out cases than the test")
    parser.add_argument("--size", type=int, default=224, help="side of the generated images (demo data: 224)")
    parser.add_argument("--out", default=None, help="folder for results.json and the plot (default: temporary)")
    parser.add_argument("--merge", nargs="+", default=None, metavar="RESULTS_JSON",
                        help="only report: merge the results.json of several runs (e.g. run in parallel)")
    args = parser.parse_args()
    if args.quick:
        args.n, args.repeats, args.steps, args.heldout = [5], 1, 4, 3
    if args.kind == "prostate":
        _use_prostate()
    if args.merge:
        runs = [r for f in args.merge for r in json.loads(Path(f).read_text())["runs"]]
        out = Path(args.out or Path(args.merge[0]).parent)
        out.mkdir(parents=True, exist_ok=True)
        return _report(runs, out, sorted({r["mode"] for r in runs}, key=MODES.index), sorted({r["n"] for r in runs}))

    import torch

    from napari_dmoe.finetune.compare import evaluate_on_pairs
    from napari_dmoe.io.checkpoint import load_model
    from napari_dmoe.io.model_list import bundled_dir

    torch.set_num_threads(args.threads)
    base_path = bundled_dir() / f"{args.kind}-dmoe.safetensors"
    base = load_model(base_path)
    work = Path(tempfile.mkdtemp(prefix="dmoe-ftlocal-"))
    out = Path(args.out) if args.out else work
    out.mkdir(parents=True, exist_ok=True)
    heldout = _heldout_csv(work / "heldout", base.spec, args.heldout, args.size, args.site,
                           8000 if args.validation else 9000)
    before = evaluate_on_pairs(base_path, heldout, split="test")
    print(f"machine: {machine()}")
    print(f"base {base_path.name}; held-out site-{args.site} Dice before: "
          + ", ".join(f"{g} {before[g]:.3f}" for g in GROUPS), flush=True)

    results = []
    for n in args.n:
        for repeat in range(args.first_repeat, args.first_repeat + args.repeats):
            for mode in args.modes:
                best, seconds, cpu = _one_run(base_path, base.spec, mode, n, repeat, args, work)
                after = evaluate_on_pairs(best, heldout, split="test")
                model = load_model(best)
                selection = model.spec.provenance.get("selection") or {}
                estimate = (selection.get("estimate") or {}).get("groups", {}).get(RARE, {})
                row = {"mode": mode, "n": n, "repeat": repeat, "site": args.site, "seconds": seconds,
                       "cpu_seconds": cpu, "settings": {"lr": args.lr, "steps": args.steps, "folds": args.folds,
                                                        "local_experts": args.local_experts, "set": args.set},
                       "validation": args.validation, "load": os.getloadavg()[0],
                       "after": after, "gain": {g: after[g] - before[g] for g in GROUPS},
                       # 0: the base was kept (cross-validation found no gain, or no step beat it on held-back cases)
                       "best_step": model.spec.provenance.get("step"),
                       "cv_steps": selection.get("steps"), "cv_estimate": estimate.get("gain"),
                       "cv_sd": (selection.get("estimate") or {}).get("sd_over_folds"),
                       "cv_mean_gain": selection.get("mean_gain")}
                if mode == "group_local":
                    row["others_bitwise"] = _bitwise_others(base, load_model(best), heldout)
                results.append(row)
                print(json.dumps(row), flush=True)
                (out / "results.json").write_text(json.dumps({"before": before, "runs": results}, indent=1))
    return _report(results, out, args.modes, args.n)


def _report(results: list[dict], out: Path, modes: list[str], ns: list[int]) -> int:
    """Table (median and range over draws), plot, and the key=value summary line (last)."""
    _plot(results, out / "finetune_local.png")
    rows = []
    for site in sorted({r.get("site", "b") for r in results}):
        for mode in modes:
            for n in ns:
                rs = [r for r in results if r.get("site", "b") == site and r["mode"] == mode and r["n"] == n]
                if not rs:
                    continue
                bitwise = ("yes" if all(r.get("others_bitwise") for r in rs) else "NO") if mode == "group_local" \
                    else "-"
                others = max(abs(r["gain"][g]) for r in rs for g in GROUPS if g != RARE)
                rows.append([site, mode, n, len(rs), sum(r.get("best_step") == 0 for r in rs),
                             _median_range([r["gain"][RARE] for r in rs]),
                             _median_range([r.get("cv_estimate") for r in rs]), f"{others:.3f}", bitwise,
                             f"{statistics.median(r['seconds'] for r in rs):.0f}",
                             f"{statistics.median(r['cpu_seconds'] for r in rs):.0f}"])
    print(table(["site", "mode", "N", "draws", "base kept", f"{RARE} gain, median (range)",
                 "estimate shown, median (range)", "others max |gain|", "others bitwise", "wall s", "CPU s"], rows))
    print(f"plot: {out / 'finetune_local.png'}")
    n_key = 10 if 10 in ns else ns[0]
    site_key = "c" if any(r.get("site") == "c" for r in results) else results[0].get("site", "b")
    key = [r for r in results if r["mode"] == "group_local" and r["n"] == n_key and r.get("site", "b") == site_key]
    others = [abs(r["gain"][g]) for r in key for g in GROUPS if g != RARE]
    print(summary({
        "site": site_key, "n": n_key, "draws": len(key),
        "local_gain_rare_median": statistics.median(r["gain"][RARE] for r in key) if key else float("nan"),
        "local_gain_rare_min": min(r["gain"][RARE] for r in key) if key else float("nan"),
        "local_max_abs_gain_others": max(others) if others else float("nan"),
        "local_bitwise_others": all(r.get("others_bitwise") for r in key) if key else "n/a",
        "local_train_wall_s": statistics.median(r["seconds"] for r in key) if key else float("nan"),
        "local_train_cpu_s": statistics.median(r["cpu_seconds"] for r in key) if key else float("nan"),
        "local_base_kept": sum(r.get("best_step") == 0 for r in key),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
