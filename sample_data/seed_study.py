#!/usr/bin/env python
"""Seed study of the fairness benchmark: each method trained with several seeds, evaluated once on a fresh test
split (site A) and on a second site (B) that no model is trained on.

    python sample_data/seed_study.py data                      # training data (= the demo data), fresh tests
    python sample_data/seed_study.py run --budget 0.25 --seeds 1 2 3 --datasets fundus --methods baseline dmoe moe
    python sample_data/seed_study.py shipped                   # the shipped demo models on the same tests
    python sample_data/seed_study.py analyse                   # -> sample_data/results/seeds/ (seed_analysis.py)
    python sample_data/seed_study.py last                      # also evaluate each finished run's final weights

Protocol (fixed before any test figure of this study was seen):
- Recipe: training/demo-<dataset>-<method>.yaml unchanged (data, model, lr, augmentation, aux loss, model selection
  by best validation ES-Dice); those choices were made on validation splits. The only change is ``--budget``: the
  fraction of the configs' steps (and validation interval) every run gets, the same for every method, chosen from
  the measured wall time per step on the shared machine, never from results.
- Seeds: the config ``seed`` (weights, data order, augmentation, and which training cases form the validation
  split); the training data are the demo data (generator seed 0).
- Test: fresh splits from generator seeds never used before (site A 2026, site B 2027), generated once; every
  trained model is evaluated once on each. Nothing is chosen or re-run after looking at them.
The study as run (2026-11-30, 2 CPU cores shared with 7 other jobs, load 10-13; measured 2.5-12 s per 2D training
step and 230-320 s per 400-image evaluation). A first attempt at budget 0.1875 (150 2D steps) was stopped during
its first run: 150 steps leave the 2D models half-trained (validation Dice 0.38 until step 114, 0.71 at step 133),
and three seeds of more than two methods do not fit at any budget where they are trained. So: budget 0.25
(200 of 800 2D steps) for 2D baseline and dMoE; when the machine quietened (load 4, 0.6 s per step), one
quarter-budget MoE run and full-budget runs; in this order:
    python sample_data/seed_study.py shipped --datasets fundus        # done first, alongside the aborted attempt
    python sample_data/seed_study.py shipped --datasets prostate &    # evaluation only, alongside the training
    python sample_data/seed_study.py run --budget 0.25 --datasets fundus --methods baseline dmoe
    python sample_data/seed_study.py run --budget 0.25 --datasets fundus --methods moe   # seed 1 trained only
    python sample_data/seed_study.py run --runs runs/seeds/full --budget 1 --seeds 1234 --datasets fundus \
        --methods baseline     # the demo's own baseline run (full budget, seed 1234), to pair with the shipped dMoE
    python sample_data/seed_study.py run --runs runs/seeds/full --budget 1 --seeds 1 --datasets fundus \
        --methods baseline dmoe                                  # the dMoE run was stopped at step 60: out of time
    python sample_data/seed_study.py run --budget 0.25 --seeds 2 3 --datasets fundus --methods moe
    python sample_data/seed_analysis.py
    python sample_data/seed_analysis.py --runs runs/seeds/full --out sample_data/results/seeds/full-budget
(the full-budget folder also got the shipped dMoE's reports, copied as reports/<test>/fundus-dmoe-shipped).
Second session (2026-11-30, evening: the machine quiet, 0.5-0.6 s per 2D step, 0.35-0.8 s per 3D step), the full budget for every
method, seeds 1234 (the demo configs' own), 1 and 2; two lanes side by side, one torch thread each:
    python sample_data/seed_study.py run --runs runs/seeds/full --budget 1 --seeds 1234 1 2 --datasets fundus \
        --methods baseline dmoe moe          # lane A (baseline 1234 and 1 were already done, so skipped)
    python sample_data/seed_study.py run --runs runs/seeds/full3d --budget 1 --seeds 1234 1 2 --datasets prostate \
        --methods baseline dmoe              # lane B
    python sample_data/seed_study.py run --runs runs/seeds/full3d --budget 1 --seeds 1234 1 2 --datasets prostate \
        --methods moe                        # lane A, then
    python sample_data/seed_study.py run --runs runs/seeds/full --budget 1 --seeds 1234 1 2 --datasets fundus \
        --methods febs                       # lane B, then the same for prostate (runs/seeds/full3d)
    python sample_data/seed_study.py last --runs runs/seeds/full --seeds 1234 1 2 --datasets fundus \
        --methods baseline dmoe moe febs     # and the same for prostate: the final weights, a sensitivity check
    python sample_data/seed_analysis.py --runs runs/seeds/full runs/seeds/full3d \
        --out sample_data/results/seeds/full-budget
    python sample_data/seed_analysis.py --runs runs/seeds/full runs/seeds/full3d --checkpoint last \
        --out sample_data/results/seeds/full-budget-last
(the shipped prostate dMoE's reports were copied into runs/seeds/full3d/reports likewise). In one lane, the whole
full-budget study is ``run --runs runs/seeds/full --budget 1 --seeds 1234 1 2 --methods baseline dmoe moe febs``
(about 3 hours of a quiet 2-core machine), then ``last`` and the two analyses.
Third session (2026-12-07, issue 26: a site-robust recipe; one core of a 2-core machine shared with other jobs,
load 5-8, 1.6-2.6 s per 2D step). Recipe: training/robust-fundus-<method>.yaml = the demo recipe plus scanner/clinic
augmentations (MONAI: contrast, gamma, bias field, resolution loss, blur, noise; each with p 0.25), fixed before
any run. A screen at a quarter budget on the validation sets was stopped after its first run: with the
augmentations the 2D dMoE had validation Dice 0.36 at step 200 (val-a 0.363), i.e. a quarter budget cannot judge a
recipe that slows the start, so the one candidate went to the full budget directly:
    python sample_data/seed_study.py run --budget 0.25 --seeds 1234 --datasets fundus --methods dmoe baseline \
        --on validation --recipe robust --runs runs/seeds/screen-aug          # stopped after the dMoE run
    python sample_data/seed_study.py run --recipe robust --runs runs/seeds/robust-full --budget 1 \
        --seeds 1234 1 2 --datasets fundus --methods dmoe baseline --on both --nice 0
(run from a frozen copy of the working tree, because other sessions edited the live one mid-run.) ``--on both``
also evaluates best and final weights on two validation-only sets (val-a: 400 fresh site-A images, generator seed
2029; val-v: 400 images of site V, seed 2028, napari_dmoe/synthetic/fundus.py). Checkpoint rule, fixed before the
validation reports were read: the one of {best validation ES-Dice on the run's own 60 images, final weights} with
the higher mean worst-group Dice over val-a and val-v across every new run; a tie goes to the final weights.
Analysis: ``seed_analysis.py --runs runs/seeds/robust-full --tests test-a site-b --old
sample_data/results/seeds/full-budget/cases.csv.gz`` (each method against its old-recipe runs of the same seeds).
Fourth session (2026-12-07 afternoon, the machine otherwise quiet: 0.6-0.7 s per 2D step, two lanes of one torch
thread each, from frozen copies of the tree). Candidates, all fixed before any of their runs, chosen among on
val-a and val-v only with sample_data/recipe_choice.py (its rule committed before their reports existed):
robust+drop (``sampling.router_dropout`` 0.2, dMoE only: the baseline has no router), robust+bz
(``sampling.group_balance`` 0.5 and ``augment.zoom`` 0.1, both methods; zoom is a field-of-view change, the kind
site_factors.py found at site B, so a win of it at B is weaker evidence), robust+bz+drop (stopped during its first
run once robust+drop had lost on validation; its core went to the 3D study):
    python sample_data/seed_study.py run --recipe robust --runs runs/seeds/robust-drop --budget 1 \
        --seeds 1234 1 2 --datasets fundus --methods dmoe --on both --nice 0 --set sampling.router_dropout=0.2
    python sample_data/seed_study.py run --recipe robust --runs runs/seeds/robust-bz --budget 1 \
        --seeds 1234 1 2 --datasets fundus --methods dmoe baseline --on both --nice 0 \
        --set sampling.group_balance=0.5 --set augment.zoom=0.1
    python sample_data/recipe_choice.py --method dmoe --candidate robust=runs/seeds/robust-full \
        --candidate robust+drop=runs/seeds/robust-drop --candidate robust+bz=runs/seeds/robust-bz
    python sample_data/recipe_choice.py --method baseline --candidate robust=runs/seeds/robust-full \
        --candidate robust+bz=runs/seeds/robust-bz
    python sample_data/seed_study.py data --datasets prostate
    python sample_data/seed_study.py run --recipe robust --runs runs/seeds/robust-3d --budget 1 \
        --seeds 1234 1 2 --datasets prostate --methods dmoe --on tests --nice 0    # and --methods baseline
    python sample_data/seed_study.py run --recipe robust --runs runs/seeds/robust-full --budget 1 \
        --seeds 1234 1 2 --datasets fundus --methods moe --on tests --nice 0      # and febs, in the other lane
Fifth session (2026-12-07 evening; two lanes of one torch thread, from a frozen copy of the tree). Candidates fixed
before any of their runs (issue 26's list, none of them suggested by a site-B result): the moving average of the
weights (``recipe.ema`` 0.995, a checkpoint rule: every run of this round writes ema.safetensors beside best and
last, and the checkpoint rule and recipe choice weigh all three on val-a and val-v) and router smoothing
(``router_smoothing`` 0.003 mild, 0.03 strong; SGD momentum makes 0.03 pull the routers nearly together):
    python sample_data/seed_study.py run --recipe robust --runs runs/seeds/robust-smooth003 --budget 1 \
        --seeds 1234 1 2 --datasets fundus --methods dmoe --on both --nice 0 --set recipe.ema=0.995 \
        --set router_smoothing=0.003                               # then 0.03 into runs/seeds/robust-smooth03
    python sample_data/seed_study.py run --recipe robust --runs runs/seeds/robust-ema --budget 1 \
        --seeds 1234 1 2 --datasets fundus --methods dmoe --on both --nice 0 --set recipe.ema=0.995
    python sample_data/seed_study.py run --recipe robust --runs runs/seeds/robust-bz-ema --budget 1 \
        --seeds 1234 1 2 --datasets fundus --methods baseline --on both --nice 0 --set recipe.ema=0.995 \
        --set sampling.group_balance=0.5 --set augment.zoom=0.1
Then, once the first two candidates' validation reports showed the average losing (it lags a model that still
improves over its last 200 steps), the baseline's average runs were paused for the last untried item of the issue's
list, a shared router mixed into each group's (``model.router_mix`` 0.5, fixed before its runs, from a later copy of
the tree), and resumed after the smoothing runs:
    python sample_data/seed_study.py run --recipe robust --runs runs/seeds/robust-mix --budget 1 \
        --seeds 1234 1 2 --datasets fundus --methods dmoe --on both --nice 0 --set model.router_mix=0.5
Sixth session (2026-12-07 evening, issue 26 item 5 and a second unseen site). The fundus demo configs became each
method's chosen recipe and the demo models were retrained (sample_data/train_demo_models.sh fundus: the shipped
dMoE is bit for bit robust-mix's seed-1234 run, the baseline robust-bz's). Site D (``TEST_SEEDS["site-d"]``,
napari_dmoe/synthetic/fundus.py; fundus only) was added after three rounds had been scored at B, its values fixed
before any model was evaluated on it; every finished 2D run was then scored there once, tests only, nothing chosen:
    python sample_data/seed_study.py data --datasets fundus                 # writes data/seed_study/site-d
    python sample_data/seed_study.py run --recipe robust --runs runs/seeds/robust-mix --budget 1 \
        --seeds 1234 1 2 --datasets fundus --methods dmoe --on tests --set model.router_mix=0.5
    (the same for robust-bz, robust-full, robust-smooth003/03 and robust-drop, with their --set lines above;
    ``shipped`` from a copy of the tree with the previous demo model, into runs/seeds/robust-full)
The old recipe's runs (runs/seeds/full) were not kept on this machine, so its dMoE and baseline were trained again
from a copy of the tree at the commit before the demo configs changed (36bbe74), and scored at D the same way:
    python sample_data/seed_study.py run --runs runs/seeds/full --budget 1 --seeds 1234 1 2 --datasets fundus \
        --methods baseline --on tests --nice 0                             # and --methods dmoe, the other lane
Then, with site D scored, a validation-only site W of D's kind (val-w, seed 2032) and a third test site E (site-e,
seed 2033) were added, both fixed before any report on them existed (plan: results/seeds/recipe-choice-4/README.md),
and every candidate's best (and ema) weights were scored on both, nothing else (``evaluate(model, "fundus", method,
name, ["val-w", "site-e"])`` for each runs folder, two lanes), before recipe_choice.py --validation val-a val-v val-w.
Seventh session (2026-12-07 night, plan: results/seeds/recipe-choice-5/README.md): cameras drawn from
fundus.CAMERA_RANGE, eight for validation (val-r1..r8) and three for the test (site-f, -g, -h); the candidates'
runs retrained (they were not kept; the same commands as above with ``--on none``), scored on validation, the
choice committed, then the tests:
    python sample_data/seed_study.py run --recipe robust --runs runs/seeds/robust-smooth03 --budget 1 \
        --seeds 1234 1 2 --datasets fundus --methods dmoe --on none --nice 0 --set recipe.ema=0.995 \
        --set router_smoothing=0.03          # and robust-full, robust-mix, robust-bz (baseline) with their --set
    python sample_data/seed_study.py score --recipe robust --runs runs/seeds/robust-smooth03 --seeds 1234 1 2 \
        --datasets fundus --methods dmoe --nice 0 --sets val-a val-v val-w val-r1 ... val-r8   # each runs folder
    python sample_data/recipe_choice.py --method dmoe --candidate robust=runs/seeds/robust-full \
        --candidate robust+mix0.5=runs/seeds/robust-mix --candidate robust+smooth0.03=runs/seeds/robust-smooth03 \
        --validation val-a val-v val-w val-r1 ... val-r8 --out sample_data/results/seeds/recipe-choice-5
    python sample_data/seed_study.py score ... --sets site-f site-g site-h test-a site-b site-d site-e
    python sample_data/seed_analysis.py --runs runs/seeds/robust-mix:dmoe runs/seeds/robust-bz:baseline \
        --tests test-a site-b site-d site-e site-f site-g site-h --out sample_data/results/seeds/site-fgh
    python sample_data/site_pool.py --runs runs/seeds/robust-mix:dmoe runs/seeds/robust-bz:baseline \
        --tests site-f site-g site-h --out sample_data/results/seeds/site-fgh/pooled-fgh-robust-mix.json
Then the sixth step (plan: results/seeds/recipe-choice-6/README.md): the candidate robust+smooth0.03+zoom0.15
(the smoothing command with ``--set augment.zoom=0.15``, runs/seeds/robust-smooth03-zoom) and test cameras site-i,
-j, -k, the same order (train, score val-*, choose, commit, score the tests; analysis into results/seeds/site-ijk).
Eighth session (2026-12-08, plan: results/seeds/site-zoom/README.md): the chosen pair retrained (bit for bit the
earlier runs; the dMoE seed-1234 run is the shipped model), scored as is and with each set's site calibration
(site_zoom.py: one round and two), the validation sets first, the choice committed, then the tests:
    python sample_data/seed_study.py run --recipe robust --runs runs/seeds/robust-mix --budget 1 --seeds 1234 1 2 \
        --datasets fundus --methods dmoe --on none --nice 0 --set model.router_mix=0.5   # robust-bz: the other lane
    python sample_data/seed_study.py score --recipe robust --runs runs/seeds/robust-mix --seeds 1234 1 2 \
        --datasets fundus --methods dmoe --nice 0 --sets val-a val-v val-w val-r1 ... val-r8
    python sample_data/site_zoom.py --runs runs/seeds/robust-mix --method dmoe --seeds 1234 1 2 \
        --sets val-a val-v val-w val-r1 ... val-r8                     # and robust-bz baseline, the other lane
    python sample_data/recipe_choice.py --method dmoe --candidate as-is=runs/seeds/robust-mix \
        --candidate zoom-1round@zoom1=runs/seeds/robust-mix --candidate zoom-2rounds@zoom=runs/seeds/robust-mix \
        --validation val-a val-v val-w val-r1 ... val-r8 --out sample_data/results/seeds/site-zoom
Training runs go one at a time (a model's evaluation overlaps the next training run) under ``nice -n 10``, one
torch thread (on the loaded 2-core machine two threads stalled on each other: 20-35 s per 2D step against 2.5-12 s
with one). Everything is resumable: a finished training run or report is never redone. Runs, logs and full
reports go to runs/seeds/ (git-ignored).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "seed_study"
RUNS = ROOT / "runs" / "seeds"
SUB = {"fundus": "fairseg", "prostate": "prostate"}
STEPS = {"fundus": (800, 100), "prostate": (1500, 250)}  # the demo configs' recipe.steps and val_every
TEST_SEEDS = {"test-a": 2026, "site-b": 2027, "site-d": 2031, "site-e": 2033, "site-f": 2050, "site-g": 2051,
              "site-h": 2052, "site-i": 2053, "site-j": 2054, "site-k": 2055}
# site-d (issue 26): a second unseen site, made after three rounds of recipes had been scored at B; site-e a third,
# made with the validation site W after D had been scored; sites f..k cameras drawn at random (fundus.draw_site),
# with the random validation sites r1..r8 (i, j, k after f, g, h had been read; fundus only)
TEST_SITES = {"test-a": "a", "site-b": "b", **{f"site-{s}": s for s in "defghijk"}}
TEST_DATASETS = {f"site-{s}": ("fundus",) for s in "defghijk"}
# Validation-only sets (issue 26): recipes are screened on these, never on the tests above. val-a: a larger site-A
# validation set than a run's own 10 % split; val-v: site V, neither A nor B (napari_dmoe/synthetic/fundus.py).
VAL_SEEDS = {"val-a": (2029, "a"), "val-v": (2028, "v"), "val-w": (2032, "w"),  # val-w: added after site D
             **{f"val-r{i}": (2040 + i, f"r{i}") for i in range(1, 9)}}  # cameras drawn at random, after site E
VAL_N = {name: 200 if name.startswith("val-r") else 400 for name in VAL_SEEDS}  # images per validation set
RECIPE = "demo"  # training/<RECIPE>-<dataset>-<method>.yaml
NICE = 10  # the first studies shared the machine with 7 other jobs; --nice 0 where this lane owns its core
EXTRA: list[str] = []  # --set overrides of a screened candidate, the same for every method
SHIPPED = {d: ROOT / "napari_dmoe" / "assets" / "models" / f"{d}-dmoe.safetensors" for d in SUB}


def _validation_sets() -> None:
    """Fundus validation sets (VAL_N images each), written by the generator's function (the CLI writes tests)."""
    from napari_dmoe.synthetic.fundus import write_fairseg

    for name, (seed, site) in VAL_SEEDS.items():
        if not (DATA / name / "fairseg" / "test.txt").is_file():
            write_fairseg(DATA / name / "fairseg", n_train=0, n_test=VAL_N[name], seed=seed, size=128, site=site)


def _log(text: str) -> None:
    line = f"{time.strftime('%H:%M:%S', time.gmtime())} {text}"
    print(line, flush=True)
    with open(RUNS / "study.log", "a") as fh:
        fh.write(line + "\n")


def _call(cmd: list[str], log: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    start = time.time()
    with open(log, "a") as fh:
        done = subprocess.run(["nice", "-n", str(NICE), *cmd], stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if done.returncode:
        _log(f"FAILED ({done.returncode}): {' '.join(cmd)}; see {log}")
        raise SystemExit(f"failed ({done.returncode}) after {time.time() - start:.0f} s: {' '.join(cmd)}; see {log}")
    _log(f"  {time.time() - start:.0f} s: {' '.join(cmd[:3])} ...")


def generate(datasets: list[str] | None = None) -> None:
    """Training data (the demo lanes' own commands, generator seed 0) and the fresh test splits (of ``datasets``,
    default all)."""
    gen = [sys.executable, "sample_data/generate.py"]
    sizes = {"fundus": ["--size", "128"], "prostate": ["--size", "64x64x32", "--spacing", "3x3x3"]}
    jobs = [(DATA / "train", "fundus", ["--n", "600", "--n-test", "400", "--seed", "0"]),
            (DATA / "train", "prostate", ["--n", "160", "--seed", "0"])]
    for name, seed in TEST_SEEDS.items():
        site = ["--site", TEST_SITES[name]]
        jobs += [(DATA / name, kind, args) for kind, args in (
            ("fundus", ["--n", "0", "--n-test", "400", "--seed", str(seed), *site]),
            ("prostate", ["--n", "80", "--seed", str(seed), *site])) if kind in TEST_DATASETS.get(name, SUB)]
    for out, kind, args in jobs:
        if (out / SUB[kind] / "provenance.json").is_file() or kind not in (datasets or SUB):
            continue
        _call([*gen, kind, "--out", str(out), *sizes[kind], *args], RUNS / "data.log")
        if kind == "prostate" and out.name in TEST_SEEDS:  # every case of a test folder is in the test split
            with open(out / "prostate" / "attributes.csv", newline="") as fh:
                rows = list(csv.reader(fh))
            from napari_dmoe.io.files import atomic_write_text

            atomic_write_text(out / "prostate" / "split.csv", "".join(
                ",".join([*r, "split" if i == 0 else "test"]) + "\n" for i, r in enumerate(rows)))


def _finished(name: str) -> bool:
    """The training run ``name`` ended normally (its events file holds the engine's "done" event)."""
    events = RUNS / f"{name}.events.jsonl"
    return events.is_file() and '"event": "done"' in events.read_text()


def _eval_args(dataset: str, test: str) -> list[str]:
    args = ["--set", f"data.root={DATA / test / SUB[dataset]}"]
    if dataset == "prostate":
        args += ["--set", "data.csv=split.csv", "--set", "data.split_column=split"]
    return args


def evaluate(model: Path, dataset: str, method: str, name: str, tests: list[str] | None = None) -> None:
    """``dmoe evaluate`` of one model on both fresh tests, or on ``tests`` (skipped when the report exists)."""
    for test in tests or [t for t in TEST_SEEDS if dataset in TEST_DATASETS.get(t, SUB)]:
        out = RUNS / "reports" / test / name
        if (out / "report.csv").is_file():
            continue
        config = f"training/{RECIPE}-{dataset}-{method}.yaml"
        _call(["dmoe", "evaluate", str(model), config, *_eval_args(dataset, test), "--out", str(out),
               "--name", method, "--n-boot", "200", "--quiet"], RUNS / f"{name}.log")


def train(dataset: str, method: str, seed: int, budget: float) -> Path:
    """One training run (skipped when it finished before); returns its best model."""
    name = f"{dataset}-{method}-s{seed}"
    out = RUNS / name
    best = out / "best.safetensors"
    events = RUNS / f"{name}.events.jsonl"
    if best.is_file() and _finished(name):
        return best
    steps, val_every = (max(1, round(v * budget)) for v in STEPS[dataset])
    _log(f"train {name}: {steps} steps, validation every {val_every}")
    _call(["dmoe", "train", f"training/{RECIPE}-{dataset}-{method}.yaml", *EXTRA,
           "--set", f"data.root={DATA / 'train' / SUB[dataset]}",
           "--set", f"output_dir={out}", "--set", f"seed={seed}", "--set", f"recipe.steps={steps}",
           "--set", f"recipe.val_every={val_every}", "--events", str(events), "--quiet"], RUNS / f"{name}.log")
    return best


def _evaluate_run(best: Path, dataset: str, method: str, seed: int, on: str) -> None:
    name = f"{dataset}-{method}-s{seed}"
    ema = best.parent / "ema.safetensors"  # recipe.ema: the weight average, a third checkpoint to choose among
    if on in ("tests", "both"):  # the tests first: they are the study; the validation reports choose the rules
        evaluate(best, dataset, method, name)
        if ema.is_file():
            evaluate(ema, dataset, method, f"{name}-ema")
    if on in ("tests", "none"):
        return
    _validation_sets()
    evaluate(best, dataset, method, name, list(VAL_SEEDS))
    evaluate(best.parent / "last.safetensors", dataset, method, f"{name}-last", list(VAL_SEEDS))
    if ema.is_file():
        evaluate(ema, dataset, method, f"{name}-ema", list(VAL_SEEDS))


def main(argv: list[str] | None = None) -> int:
    global RUNS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("step", choices=["data", "run", "score", "shipped", "last", "analyse"])
    p.add_argument("--budget", type=float, default=1.0, help="fraction of the demo configs' steps (same for all)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--datasets", nargs="+", choices=sorted(SUB), default=["fundus", "prostate"])
    p.add_argument("--methods", nargs="+", choices=["baseline", "febs", "moe", "dmoe"],
                   default=["baseline", "dmoe", "moe"])
    p.add_argument("--runs", type=Path, default=RUNS, help="folder for runs, logs and reports (another per budget)")
    p.add_argument("--recipe", default="demo", help="config family: training/<recipe>-<dataset>-<method>.yaml")
    p.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                   help="config override of a screened candidate, for every method alike")
    p.add_argument("--sets", nargs="+", help="score: the test or validation sets to evaluate finished runs on")
    p.add_argument("--checkpoint", choices=["best", "last", "ema"], default="best", help="score: which weights")
    p.add_argument("--on", choices=["tests", "validation", "both", "none"], default="tests",
                   help="evaluate on the fresh tests (A, B), or only on the validation sets (val-a, val-v) with best "
                        "and last weights both (screening never looks at a test), or both, or none (train only, "
                        "then score)")
    p.add_argument("--nice", type=int, default=10, help="niceness of the training and evaluation processes")
    args = p.parse_args(argv)
    unknown = set(args.sets or ()) - set(TEST_SEEDS) - set(VAL_SEEDS)
    if unknown or (args.step == "score" and not args.sets):  # refused before anything is written
        p.error(f"score needs --sets from {[*TEST_SEEDS, *VAL_SEEDS]}; unknown: {sorted(unknown)}")
    global RECIPE, NICE
    RECIPE, RUNS, NICE = args.recipe, args.runs.resolve(), args.nice
    EXTRA[:] = [x for kv in args.extra for x in ("--set", kv)]
    RUNS.mkdir(parents=True, exist_ok=True)
    if args.step == "analyse":
        from seed_analysis import main as analyse

        return analyse(["--runs", str(RUNS)])
    generate(args.datasets)
    if args.step == "last":  # a sensitivity check of the checkpoint choice, made after the runs, for every run alike
        for dataset in args.datasets:
            for seed in args.seeds:
                for method in args.methods:
                    name = f"{dataset}-{method}-s{seed}"
                    if _finished(name):
                        evaluate(RUNS / name / "last.safetensors", dataset, method, f"{name}-last")
    if args.step == "score":  # finished runs on named sets only (a choice's validation first, its tests after)
        if set(args.sets) & set(VAL_SEEDS):
            _validation_sets()
        suffix = "" if args.checkpoint == "best" else f"-{args.checkpoint}"
        for dataset in args.datasets:
            for seed in args.seeds:
                for method in args.methods:
                    name = f"{dataset}-{method}-s{seed}"
                    model = RUNS / name / f"{args.checkpoint}.safetensors"
                    if _finished(name) and model.is_file():
                        evaluate(model, dataset, method, name + suffix, args.sets)
    if args.step == "shipped":
        for dataset in args.datasets:
            evaluate(SHIPPED[dataset], dataset, "dmoe", f"{dataset}-dmoe-shipped")
    if args.step == "run":
        _log(f"run: budget {args.budget}, seeds {args.seeds}, {args.datasets} x {args.methods}")
        (RUNS / "budget.json").write_text(json.dumps({"budget": args.budget, "steps": STEPS, "recipe": RECIPE,
                                                      "set": args.extra, "on": args.on}))
        pending = threading.Thread()  # a model's evaluation overlaps the next training run (never two of either)
        pending.start()
        for dataset in args.datasets:  # seed-major: a partial study is still balanced across methods
            for seed in args.seeds:
                for method in args.methods:
                    best = train(dataset, method, seed, args.budget)
                    pending.join()
                    pending = threading.Thread(target=_evaluate_run, args=(best, dataset, method, seed, args.on))
                    pending.start()
        pending.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
