"""Batch throughput of ``dmoe segment --csv``: cases per second with 1 and 2 processes (torchrun, Gloo on CPU)
on the demo models: 2D fundus (224x224 PNG) and 3D prostate CT (96x96x32 NIfTI, the napari sample's size).

    python bench/bench_throughput.py                      # CPU: 1 and 2 processes, 24 2D and 6 3D cases
    python bench/bench_throughput.py --cases2d 200 --cases3d 40 --procs 1 2 4 8 --device cuda   # GPUs

Each run is a fresh batch (new output folder) timed from the process start to its end, so start-up (imports,
model load, process group) is included, as a user sees it; cases/s = cases / wall. On CPU every process gets
1 thread (torchrun's default) and the single process gets as many threads as there are processes in the largest
run, so both rows use the same cores. Last line: key=value pairs.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _util import machine, summary, table

MODELS = HERE.parent / "napari_dmoe" / "assets" / "models"


def write_cases(folder: Path, n2d: int, n3d: int) -> dict[str, tuple[Path, Path, Path]]:
    """Synthetic demo-like cases and their CSVs: {kind: (model, images folder, csv)}."""
    import imageio.v3 as iio

    from napari_dmoe.io.images import write_volume
    from napari_dmoe.synthetic import RACES, STAGES, make_fundus, make_prostate

    out = {}
    for kind, n in (("2d", n2d), ("3d", n3d)):
        if n <= 0:
            continue
        images = folder / kind
        images.mkdir(parents=True)
        rows = ["image," + ("race" if kind == "2d" else "stage")]
        for i in range(n):
            if kind == "2d":
                race = RACES[i % len(RACES)]
                iio.imwrite(images / f"f{i:04d}.png", make_fundus(i, race=race, size=224).image)
                rows.append(f"f{i:04d}.png,{race}")
            else:
                stage = STAGES[i % len(STAGES)]
                image, _, spacing = make_prostate(i, stage=stage).napari_order()
                write_volume(images / f"p{i:04d}.nii.gz", image, spacing)
                rows.append(f"p{i:04d}.nii.gz,{stage}")
        csv = folder / f"{kind}.csv"
        csv.write_text("\n".join(rows) + "\n")
        model = MODELS / ("fundus-dmoe.safetensors" if kind == "2d" else "prostate-dmoe.safetensors")
        out[kind] = (model, images, csv)
    return out


def run_batch(model: Path, images: Path, csv: Path, out: Path, procs: int, device: str, threads: int) -> float:
    """Wall seconds of one batch with ``procs`` processes."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
                if procs > 1 else [sys.executable])
    cmd = [*launcher, "-m", "napari_dmoe.cli.main", "segment", str(model), str(images), "--csv", str(csv),
           "-o", str(out), "--device", device, "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t = time.perf_counter()
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases2d", type=int, default=24)
    parser.add_argument("--cases3d", type=int, default=6)
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (one GPU per process)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per row (the best is kept)")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    folder = Path(tempfile.mkdtemp(prefix="dmoe-throughput-"))
    cases = write_cases(folder, args.cases2d, args.cases3d)
    rows, results = [], {}
    for kind, (model, images, csv) in cases.items():
        n = args.cases2d if kind == "2d" else args.cases3d
        base = None
        for procs in args.procs:
            # one process gets the threads the largest run spreads over its processes (same cores on CPU)
            threads = 1 if procs > 1 or args.device != "cpu" else max(args.procs)
            walls = [run_batch(model, images, csv, folder / f"out-{kind}-{procs}-{r}", procs, args.device, threads)
                     for r in range(args.repeats)]
            wall = min(walls)
            rate = n / wall
            base = base or rate
            rows.append([kind, procs, n, wall, rate, rate / base])
            results[f"{kind}_p{procs}_cases_per_s"] = rate
    print(f"load after: {os.getloadavg()[0]:.2f}")
    print(table(["model", "processes", "cases", "wall s", "cases/s", "speed-up"], rows))
    print(summary({**results, "device": args.device}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
