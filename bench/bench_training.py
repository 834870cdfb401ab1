#!/usr/bin/env python
"""Training throughput (samples/s) of the one engine: 2D and 3D presets, and 1 vs 2 processes.

    python bench/bench_training.py [--quick] [--steps N] [--out DIR] [--device cpu|cuda]

Every case is a real ``dmoe train`` subprocess on synthetic data (napari_dmoe.synthetic) reading its JSON-lines
events; throughput is the median over steps after the first two (warm-up), validation excluded. The 1-vs-2
comparison gives both sides the same 2 cores: one process with 2 threads against two torchrun processes with 1
thread each (and one process with 1 thread), same global batch. On CUDA the paper presets are added (AMP, as
the recipes train) and the 1-vs-2 comparison needs two GPUs (NCCL, one per process). The last line is a
key=value summary.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from _util import machine, summary, table  # noqa: E402

CASES = {  # name -> (preset, overrides, dataset, batch)
    "2d-tiny": ("transunet2d-tiny", {}, "fairseg", 8),
    "2d-small": ("transunet2d-small", {}, "fairseg", 8),
    "3d-tiny": ("resunet3d-tiny", {}, "prostate", 2),
    "3d-small": ("resunet3d-small", {"input_size": [64, 64, 64]}, "prostate", 2),
}
GPU_CASES = {  # added on CUDA
    "2d-paper": ("transunet2d-paper", {}, "fairseg", 24),
    "3d-paper": ("resunet3d-paper", {"input_size": [64, 64, 64]}, "prostate", 2),
}


def make_data(root: Path, n_test: int = 4, size: int = 128, n_volumes: int = 8,
              val: tuple[float, float] = (0.05, 0.15)) -> dict[str, dict]:
    """48 fundus images and ``n_volumes`` prostate volumes under ``root``; their data config sections (bench_contention
    uses other sizes and no validation split)."""
    from napari_dmoe.synthetic import write_fairseg, write_prostate

    fundus = write_fairseg(root / "fairseg", n_train=48, n_test=n_test, size=size)
    prostate = write_prostate(root / "prostate", n=n_volumes, shape=(64, 64, 32))
    return {
        "fairseg": {"format": "fairseg", "root": str(fundus), "attributes": "race", "crop": None,
                    "val_fraction": val[0], "normalization": {"kind": "scale", "factor": 255}},
        "prostate": {"format": "nifti", "root": str(prostate), "attributes": "stage", "val_fraction": val[1],
                     "test_fraction": 0.0, "class_names": ["background", "ctv"],
                     "normalization": {"kind": "window", "low": -200, "high": 300}},
    }


def run_case(work: Path, name: str, data: dict, steps: int, nproc: int = 1, threads: int = 2,
             device: str = "cpu") -> float:
    """Median samples/s of one ``dmoe train`` run (wall time per step, data loading included)."""
    preset, overrides, dataset, batch = {**CASES, **GPU_CASES}[name]
    tag = f"{name}-{nproc}x{threads}"
    cfg = {"name": name, "output_dir": str(work / tag), "method": "dmoe", "data": data[dataset],
           "model": {"preset": preset, "overrides": overrides, "n_experts": 8, "top_k": 2},
           "recipe": {"name": "3d" if dataset == "prostate" else "paper2d", "steps": steps, "batch_size": batch,
                      "val_every": 10**6, "checkpoint_every": 10**6}}
    path = work / f"{tag}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    events = work / f"{tag}.jsonl"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] \
        if nproc > 1 else [sys.executable]
    cmd = [*launcher, "-m", "napari_dmoe.cli.main", "train", str(path), "--events", str(events), "--device", device,
           "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-2000:]}")
    rates = [e["throughput"] for e in map(json.loads, events.read_text().splitlines()) if e["event"] == "step"]
    return statistics.median(rates[2:] if len(rates) > 3 else rates)


def torch_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny presets, 4 steps: checks the script works")
    parser.add_argument("--steps", type=int, default=None, help="steps per case (default 20, --quick 4)")
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temp folder)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = parser.parse_args(argv)
    steps = args.steps or (4 if args.quick else 20)
    cuda = args.device.startswith("cuda")
    names = ["2d-tiny", "3d-tiny"] if args.quick else list(CASES) + (list(GPU_CASES) if cuda else [])
    both = {**CASES, **GPU_CASES}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.out or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = make_data(work / "data")
        rows, results = [], {}
        for name in names:
            rate = run_case(work, name, data, steps, device=args.device)
            rows.append([name, both[name][0], both[name][3], 1, rate])
            results[f"{name.replace('-', '_')}_sps"] = rate
        if not cuda:  # the same cores shared by one process or two
            one = run_case(work, "2d-tiny", data, steps, nproc=1, threads=1)
            rows.append(["2d-tiny (1 thread)", CASES["2d-tiny"][0], CASES["2d-tiny"][3], 1, one])
            two = run_case(work, "2d-tiny", data, steps, nproc=2, threads=1)
            rows.append(["2d-tiny (1 thread each)", CASES["2d-tiny"][0], CASES["2d-tiny"][3], 2, two])
            results["2d_tiny_1thread_sps"] = one
            results["ddp2_sps"] = two
            results["ddp2_over_1"] = two / max(results["2d_tiny_sps"], one)
        elif torch_gpus() >= 2:  # one GPU per process
            name = "2d-small" if "2d-small" in names else "2d-tiny"
            two = run_case(work, name, data, steps, nproc=2, device=args.device)
            rows.append([f"{name} (2 GPUs)", both[name][0], both[name][3], 2, two])
            results["ddp2_sps"] = two
            results["ddp2_over_1"] = two / results[f"{name.replace('-', '_')}_sps"]
        else:
            print("one GPU: the 1-vs-2-process comparison needs two")
    if cuda:
        import torch

        print(f"device: {torch.cuda.get_device_name(0)}")
    print(f"machine: {machine()}")
    print(f"steps per case: {steps} (median samples/s over steps 3..{steps})")
    print(table(["case", "preset", "global batch", "processes", "samples/s"], rows))
    print(summary({"bench": "training", **results, "steps": steps, "quick": int(args.quick)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
