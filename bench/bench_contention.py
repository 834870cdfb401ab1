#!/usr/bin/env python
"""CPU threads on a busy machine: training step time and time to first mask with 0, 1 and 2 competing busy
processes, torch's default thread count beside one thread and the automatic rule (napari_dmoe.threads).

    python bench/bench_contention.py                   # 2D + 3D training and first masks, loads 0 1 2
    python bench/bench_contention.py --quick           # 2D training only, loads 0 1, 3 steps: checks it works
    python bench/bench_contention.py --repeats 2 --loads 1

Each measurement is a fresh ``dmoe`` process. A competing process is ``python -c "while True: pass"`` (one busy
core each), started before and killed after each load level. Policies: ``default`` = ``--threads N`` with N what
torch picks in a fresh process here (what every run did before issue 27), ``one`` = ``--threads 1``, ``auto`` =
no option and no OMP_NUM_THREADS/DMOE_THREADS (the rule, as a user gets it now); first masks run ``default``
and ``auto`` only (the rule picks one thread whenever another process is busy). Runs of one load level are
interleaved (policy after policy) so background load hits all alike; the machine's own load average is printed
with every level, because other work on the machine is not under the script's control.

- training: ``dmoe train`` on synthetic data, the demo recipes' networks (2D: transunet2d-small hidden 128 at
  224 px, batch 16; 3D: resunet3d-small on 64^3 windows, batch 2); step time = wall time per step from the
  events (data loading included), median over the steps after the first, and its range.
- first mask: wall time of ``dmoe segment`` on the napari demo samples (2D fundus PNG, 3D prostate CT) with the
  bundled models, from process start to exit.

Last line: key=value pairs (``<work>_<policy>_l<load>`` medians in seconds; ratios to one thread for training,
to the rule for first masks). No validation split, so a run is its steps and one final save.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _util import machine, summary, table  # noqa: E402

MODELS = HERE.parent / "napari_dmoe" / "assets" / "models"
DMOE = [sys.executable, "-m", "napari_dmoe.cli.main"]
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "DMOE_THREADS", "DMOE_THREADS_RESERVE")
TRAIN = {  # work -> (dataset, model section, recipe name, batch)
    "train2d": ("fairseg", {"preset": "transunet2d-small", "overrides": {"hidden": 128, "heads": 4, "mlp_dim": 512}},
                "paper2d", 16),
    "train3d": ("prostate", {"preset": "resunet3d-small", "overrides": {"input_size": [64, 64, 64]}}, "3d", 2),
}
MASKS = {"mask2d": ("fundus-dmoe.safetensors", "fundus", "Black"), "mask3d": ("prostate-dmoe.safetensors",
                                                                             "prostate", "T3")}


def torch_default_threads() -> int:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=env,
                         capture_output=True, text=True, check=True)
    return int(out.stdout)


def make_data(root: Path) -> dict[str, dict]:
    from bench_training import make_data as training_data  # one writer of the bench datasets

    return training_data(root, n_test=2, size=200, n_volumes=6, val=(0.0, 0.0))


def policy_args(policy: str, default: int) -> list[str]:
    return {"default": ["--threads", str(default)], "one": ["--threads", "1"], "auto": []}[policy]


def run_train(work: Path, name: str, data: dict, steps: int, policy: str, default: int, tag: str
              ) -> tuple[list[float], str]:
    """Step times (s, after the first step) of one ``dmoe train`` process, and the thread line it logged."""
    dataset, model, recipe, batch = TRAIN[name]
    out = work / f"{name}-{tag}"
    cfg = {"name": name, "output_dir": str(out), "method": "dmoe", "data": data[dataset],
           "model": {**model, "n_experts": 8, "top_k": 2},
           "recipe": {"name": recipe, "steps": steps, "batch_size": batch, "val_every": 10**6,
                      "checkpoint_every": 10**6}}
    path = work / f"{name}-{tag}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    events = work / f"{name}-{tag}.jsonl"
    cmd = [*DMOE, "train", str(path), "--events", str(events), "--device", "cpu", "--quiet",
           *policy_args(policy, default)]
    proc = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{name} {policy} failed:\n{proc.stderr[-2000:]}")
    records = [json.loads(line) for line in events.read_text().splitlines()]
    start = next(r for r in records if r["event"] == "start")
    times = [batch / r["throughput"] for r in records if r["event"] == "step"][1:]
    return times, f"{start.get('threads')} ({start.get('threads_reason')})"


def run_mask(work: Path, name: str, samples: dict[str, Path], policy: str, default: int, tag: str
             ) -> tuple[list[float], str]:
    model, sample, value = MASKS[name]
    out = work / f"{name}-{tag}{'.png' if sample == 'fundus' else '.nii.gz'}"
    # --force: the time of the work, whatever the fit check thinks of the synthetic sample
    cmd = [*DMOE, "segment", str(MODELS / model), str(samples[sample]), "-a", value, "-o", str(out), "--device",
           "cpu", "--force", *policy_args(policy, default)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"{name} {policy} failed:\n{proc.stderr[-2000:]}")
    line = next((ln for ln in proc.stderr.splitlines() if "CPU thread" in ln), "")
    return [wall], line.split(": ", 1)[-1]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in THREAD_VARS}


def busy_processes(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2D training only, loads 0 and 1, 3 steps")
    parser.add_argument("--loads", type=int, nargs="+", default=None, help="competing busy processes (default 0 1 2)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per (load, work, policy) (default 1)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default 4, --quick 3)")
    parser.add_argument("--works", nargs="+", default=None, choices=[*TRAIN, *MASKS])
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temp folder)")
    args = parser.parse_args(argv)
    loads = args.loads or ([0, 1] if args.quick else [0, 1, 2])
    steps = args.steps or (3 if args.quick else 4)
    works = args.works or (["train2d"] if args.quick else [*TRAIN, *MASKS])
    default = torch_default_threads()
    # masks: torch's default against the rule (which picks one thread whenever another process is busy)
    policies = {name: ["default", "one", "auto"] if name in TRAIN else ["default", "auto"] for name in works}
    rows, results, background = [], {}, []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.out or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = make_data(work / "data") if any(w in TRAIN for w in works) else {}
        samples = {}
        if any(w in MASKS for w in works):
            from bench_first_mask import write_samples

            samples = write_samples(work)
        for load in loads:
            procs = busy_processes(load)
            try:
                time.sleep(1.0)
                background.append(f"{load} competing: load average {os.getloadavg()[0]:.1f} at start")
                got: dict[tuple[str, str], tuple[list[float], list[str]]] = {}
                for r in range(args.repeats):
                    for name in works:
                        for policy in policies[name]:
                            tag = f"l{load}-{policy}-r{r}"
                            times, line = (run_train(work, name, data, steps, policy, default, tag)
                                           if name in TRAIN else run_mask(work, name, samples, policy, default, tag))
                            all_times, lines = got.setdefault((name, policy), ([], []))
                            all_times.extend(times)
                            lines.append(line)
                background[-1] += f", {os.getloadavg()[0]:.1f} at end"
            finally:
                for p in procs:
                    p.kill()
                    p.wait()
            for (name, policy), (times, lines) in got.items():
                med = statistics.median(times)
                rows.append([load, name, policy, med, f"{min(times):.2f}-{max(times):.2f}", len(times),
                             "; ".join(dict.fromkeys(lines))])
                results[f"{name}_{policy}_l{load}"] = med
            for name in works:
                base = "one" if name in TRAIN else "auto"
                for policy in [p for p in policies[name] if p != base]:
                    results[f"{name}_{policy}_over_{base}_l{load}"] = (results[f"{name}_{policy}_l{load}"]
                                                                       / results[f"{name}_{base}_l{load}"])
    print(f"machine: {machine()}; torch default threads here: {default}")
    print("background: " + " | ".join(background))
    print(f"training: {steps} steps per run, step time = median over steps 2..{steps} of all runs; "
          f"first mask: process wall time; repeats {args.repeats}")
    print(table(["busy", "work", "policy", "median s", "range s", "n", "threads"], rows))
    print(summary({"bench": "contention", **results, "repeats": args.repeats, "quick": int(args.quick)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
