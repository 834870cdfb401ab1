"""Summarise the fairness benchmark written by ``sample_data/train_demo_models.sh`` and ship the demo models.

Reads ``RESULTS/<dataset>/<method>/report.json`` (written by ``dmoe evaluate`` on the held-out test split) and
writes, into RESULTS:
- ``summary.csv`` / ``summary.json``: per dataset, method and class: overall Dice, per-group Dice, worst-group
  Dice and ES-Dice with bootstrap 95 % CIs, plus the issue's target check (dMoE vs baseline);
- ``benchmark.md``: the same as Markdown tables (pasted into BENCHMARKS.md);
- ``per_group_dice.png``: per-group Dice per method with CIs;
- ``provenance.json``: command, git commit, configs and training time of every run.

``--datasets`` names the data sets trained by this invocation (default: all with reports): only their runs'
provenance is rewritten (the others' entries are kept from the existing provenance.json) and only their models ship.
``--ship DIR`` copies each such dataset's dMoE model to ``DIR/<dataset>-dmoe.safetensors`` with the test-split
metrics added to its spec (``spec.metrics["test"]``) next to the validation metrics the engine recorded.
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

METHODS = ("baseline", "febs", "moe", "dmoe")
DATASETS = {"fundus": "2D fundus (race)", "prostate": "3D prostate CT (T stage)", "skin": "2D skin lesion (age group)"}
TARGET_GAIN = 0.05  # the target: dMoE worst-group Dice at least this much above the baseline's


def load_reports(results: Path) -> dict[str, dict[str, dict]]:
    """dataset -> method -> report.json content, for the reports that exist."""
    out: dict[str, dict[str, dict]] = {}
    for dataset in DATASETS:
        for method in METHODS:
            path = results / dataset / method / "report.json"
            if path.is_file():
                out.setdefault(dataset, {})[method] = json.loads(path.read_text())
    if not out:
        raise SystemExit(f"no report.json under {results}/<dataset>/<method>/: run sample_data/train_demo_models.sh")
    return out


def class_rows(report: dict) -> list[dict[str, Any]]:
    """One row per foreground class, plus a "mean" row when there are several classes."""
    rows = []
    for cname, c in report["classes"].items():
        ci = c["ci95"]
        rows.append({
            "class": cname, "n": report["n_images"], "dice": c["dice"], "dice_ci": ci["dice"],
            "es_dice": c["es_dice"], "es_dice_ci": ci["es_dice"], "worst_group": c["worst_group"],
            "worst_group_dice": c["worst_group_dice"],
            "groups": {g: {"n": v["n"], "dice": v["dice"], "dice_ci": ci["groups"][g]["dice"]}
                       for g, v in c["groups"].items()},
        })
    if len(rows) > 1:  # mean over classes: per-group Dice averaged over classes, worst group of that mean
        groups = {g: {"n": rows[0]["groups"][g]["n"], "dice": sum(r["groups"][g]["dice"] for r in rows) / len(rows),
                      "dice_ci": None} for g in rows[0]["groups"]}
        worst = min(groups, key=lambda g: groups[g]["dice"])
        summary = report["mean_over_classes"]
        rows.append({"class": "mean", "n": report["n_images"], "dice": summary["dice"], "dice_ci": None,
                     "es_dice": summary["es_dice"], "es_dice_ci": None, "worst_group": worst,
                     "worst_group_dice": groups[worst]["dice"], "groups": groups})
    return rows


def target_check(rows: dict[str, list[dict]]) -> dict[str, Any] | None:
    """The issue's target on the class-mean row (or the only class): dMoE vs baseline and vs all methods."""
    if "dmoe" not in rows or "baseline" not in rows:
        return None
    pick = {m: r[-1] for m, r in rows.items()}
    d, b = pick["dmoe"], pick["baseline"]
    best_es = max(pick, key=lambda m: pick[m]["es_dice"])
    return {
        "class": d["class"],
        "worst_group_gain": d["worst_group_dice"] - b["worst_group_dice"],
        "worst_group_gain_ok": d["worst_group_dice"] - b["worst_group_dice"] >= TARGET_GAIN,
        "best_es_dice_method": best_es, "best_es_dice_ok": best_es == "dmoe",
        "overall_dice_change": d["dice"] - b["dice"], "overall_dice_ok": d["dice"] >= b["dice"],
    }


def _ci(value: float, ci: list | None) -> str:
    return f"{value:.3f}" if not ci else f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def markdown(reports: dict[str, dict[str, dict]], summary: dict[str, Any]) -> str:
    lines = []
    for dataset, by_method in reports.items():
        rows = summary[dataset]["rows"]
        groups = list(next(iter(rows.values()))[0]["groups"])
        n_groups = next(iter(rows.values()))[0]["groups"]
        lines += [f"### {DATASETS[dataset]}, test split ({next(iter(by_method.values()))['n_images']} cases: "
                  + ", ".join(f"{g} {n_groups[g]['n']}" for g in groups) + ")", "",
                  "| method | class | Dice | " + " | ".join(f"{g} Dice" for g in groups)
                  + " | worst group Dice | ES-Dice |",
                  "|---|---|---|" + "---|" * len(groups) + "---|---|"]
        for method, mrows in rows.items():
            for r in mrows:
                cells = [_ci(r["groups"][g]["dice"], r["groups"][g]["dice_ci"]) for g in groups]
                lines.append(f"| {method} | {r['class']} | {_ci(r['dice'], r['dice_ci'])} | " + " | ".join(cells)
                             + f" | {r['worst_group_dice']:.3f} ({r['worst_group']}) | "
                               f"{_ci(r['es_dice'], r['es_dice_ci'])} |")
        check = summary[dataset]["target"]
        if check:
            lines += ["", f"Target check ({check['class']}): dMoE worst-group Dice {check['worst_group_gain']:+.3f} "
                          f"vs baseline (target +{TARGET_GAIN}: {'met' if check['worst_group_gain_ok'] else 'NOT met'}); "
                          f"best ES-Dice: {check['best_es_dice_method']} "
                          f"({'met' if check['best_es_dice_ok'] else 'NOT met'}); overall Dice "
                          f"{check['overall_dice_change']:+.3f} ({'met' if check['overall_dice_ok'] else 'NOT met'})."]
        lines.append("")
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> Path:
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [(d, r) for d in summary for r in range(len(next(iter(summary[d]["rows"].values()))))
              if next(iter(summary[d]["rows"].values()))[r]["class"] != "mean"]
    fig = Figure(figsize=(4.2 * len(panels), 3.6), dpi=100)
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    colours = {"baseline": "#888888", "febs": "#4c9be8", "moe": "#f0a030", "dmoe": "#d0413e"}
    for ax, (dataset, k) in zip(axes, panels):
        rows = summary[dataset]["rows"]
        methods = list(rows)
        groups = list(rows[methods[0]][k]["groups"])
        width = 0.8 / len(methods)
        for j, m in enumerate(methods):
            g = rows[m][k]["groups"]
            vals = np.array([g[x]["dice"] for x in groups])
            lo = np.array([g[x]["dice_ci"][0] if g[x]["dice_ci"] else g[x]["dice"] for x in groups])
            hi = np.array([g[x]["dice_ci"][1] if g[x]["dice_ci"] else g[x]["dice"] for x in groups])
            x = np.arange(len(groups)) + (j - (len(methods) - 1) / 2) * width
            ax.bar(x, vals, width, color=colours.get(m, "k"), label=m,
                   yerr=np.clip([vals - lo, hi - vals], 0, None), capsize=2)
        ax.set_xticks(np.arange(len(groups)), [f"{x}\n(n={rows[methods[0]][k]['groups'][x]['n']})" for x in groups])
        ax.set_ylim(0, 1)
        ax.set_title(f"{DATASETS[dataset]}: {rows[methods[0]][k]['class']}", fontsize=9)
        ax.set_ylabel("test Dice (95 % CI)")
    axes[0].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    return path


def run_provenance(runs: Path, reports: dict[str, dict[str, dict]], command: str, datasets: list[str],
                   previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """Provenance of every run; runs of data sets outside ``datasets`` keep their entry from ``previous``, with the
    command and commit that made them (each entry names its own, since lanes can be rerun separately)."""
    commit = _git_commit()
    out: dict[str, Any] = {"command": command, "git_commit": commit, "runs": {}}
    old = (previous or {}).get("runs", {})
    for dataset, by_method in reports.items():
        for method in by_method:
            key = f"{dataset}/{method}"
            if dataset not in datasets and key in old:
                out["runs"][key] = {"command": previous.get("command"), "git_commit": previous.get("git_commit"),
                                    **old[key]}
                continue
            events = runs / f"demo-{dataset}-{method}.events.jsonl"
            done = {}
            if events.is_file():
                for line in events.read_text().splitlines():
                    event = json.loads(line)
                    if event.get("event") in ("start", "done"):
                        done[event["event"]] = event
            start = done.get("start", {})
            out["runs"][key] = {
                "command": command, "git_commit": commit, "config": f"training/demo-{dataset}-{method}.yaml", "steps": start.get("total_steps"),
                "batch_size": start.get("batch_size"), "train_seconds": done.get("done", {}).get("seconds"),
                "best_step": done.get("done", {}).get("best_step"), "device": start.get("device"),
            }
    return out


def _git_commit() -> str | None:
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() or None


def ship(runs: Path, dest: Path, summary: dict[str, Any], command: str, datasets: list[str]) -> list[Path]:
    """Copy the dMoE model of each of ``datasets`` to ``dest`` with its test metrics added to the spec."""
    from napari_dmoe.io.checkpoint import load_model, save_model

    written = []
    for dataset in (d for d in summary if d in datasets):
        src = runs / f"demo-{dataset}-dmoe" / "best.safetensors"
        if "dmoe" not in summary[dataset]["rows"] or not src.is_file():
            continue
        model = load_model(src)
        rows = summary[dataset]["rows"]["dmoe"]
        model.spec.metrics = {**model.spec.metrics, "test": {
            "split": "test", "n": rows[0]["n"],
            "classes": {r["class"]: {k: r[k] for k in ("dice", "dice_ci", "es_dice", "es_dice_ci", "worst_group",
                                                       "worst_group_dice", "groups")} for r in rows}}}
        model.spec.provenance = {**model.spec.provenance, "benchmark_command": command,
                                 "benchmark": "sample_data/results/summary.json"}
        dest.mkdir(parents=True, exist_ok=True)
        written.append(save_model(dest / f"{dataset}-dmoe.safetensors", model.network, model.spec))
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", type=Path, default=Path("sample_data/results"))
    p.add_argument("--runs", type=Path, default=Path("runs"))
    p.add_argument("--ship", type=Path, default=None, help="folder to copy the dMoE models to")
    p.add_argument("--command", default="bash sample_data/train_demo_models.sh")
    p.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), default=None,
                   help="data sets trained by this run (default: all with reports): only these ship")
    args = p.parse_args(argv)

    reports = load_reports(args.results)
    datasets = args.datasets or list(reports)
    summary: dict[str, Any] = {}
    for dataset, by_method in reports.items():
        rows = {m: class_rows(r) for m, r in by_method.items()}
        summary[dataset] = {"rows": rows, "target": target_check(rows)}
    (args.results / "summary.json").write_text(json.dumps(summary, indent=2))
    with open(args.results / "summary.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["dataset", "method", "class", "n", "dice", "dice_lo", "dice_hi", "es_dice", "es_lo", "es_hi",
                    "worst_group", "worst_group_dice", "group", "group_n", "group_dice", "group_lo", "group_hi"])
        for dataset, s in summary.items():
            for method, mrows in s["rows"].items():
                for r in mrows:
                    for g, v in r["groups"].items():
                        w.writerow([dataset, method, r["class"], r["n"], r["dice"], *(r["dice_ci"] or ["", ""]),
                                    r["es_dice"], *(r["es_dice_ci"] or ["", ""]), r["worst_group"],
                                    r["worst_group_dice"], g, v["n"], v["dice"], *(v["dice_ci"] or ["", ""])])
    text = markdown(reports, summary)
    (args.results / "benchmark.md").write_text(text)
    plot(summary, args.results / "per_group_dice.png")
    prov_path = args.results / "provenance.json"
    previous = json.loads(prov_path.read_text()) if prov_path.is_file() else None
    prov_path.write_text(json.dumps(run_provenance(args.runs, reports, args.command, datasets, previous), indent=2))
    print(text)
    if args.ship:
        for path in ship(args.runs, args.ship, summary, args.command, datasets):
            print(f"shipped {path} ({path.stat().st_size / 1e6:.1f} MB)")
    print(summary_line(summary))
    return 0


def summary_line(summary: dict[str, Any]) -> str:
    """The machine-readable last line: ``key=value`` pairs (class-mean row, or the only class, per method)."""
    parts = ["bench=fairness"]
    for dataset, s in summary.items():
        for method, rows in s["rows"].items():
            r = rows[-1]
            parts += [f"{dataset}_{method}_dice={r['dice']:.4f}", f"{dataset}_{method}_es_dice={r['es_dice']:.4f}",
                      f"{dataset}_{method}_worst_group_dice={r['worst_group_dice']:.4f}"]
        if s["target"]:
            parts += [f"{dataset}_worst_group_gain={s['target']['worst_group_gain']:.4f}",
                      f"{dataset}_target_met={int(s['target']['worst_group_gain_ok'])}"]
    return " ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
