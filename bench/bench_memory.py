"""Peak memory of 3D inference (``segment`` with routing maps) at two volume sizes, each in a fresh process.

    python bench/bench_memory.py            # 100x256x256 and 300x512x512 (z, y, x), resunet3d-small
    python bench/bench_memory.py --quick    # 64x64x64 and 64x96x96, resunet3d-tiny, seconds

tracemalloc does not see torch's allocations, so each size runs in its own subprocess that reads the kernel's
high-water mark of resident memory (VmHWM in /proc/self/status). The output arrays (labels, probabilities,
routing maps, dominant expert) are reported separately: "beyond outputs" = peak - outputs. The image is int16,
as CT scans are stored. Goal: "beyond outputs" of the two sizes at most 1.5x apart. Last line: ``key=value``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import machine, summary, table  # noqa: E402

FULL = {"preset": "resunet3d-small", "sizes": [(100, 256, 256), (300, 512, 512)]}
QUICK = {"preset": "resunet3d-tiny", "sizes": [(64, 64, 64), (64, 96, 96)]}
MB = 2**20


def vm(field: str) -> int:
    """A memory figure of this process from /proc/self/status, in bytes (Linux only)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status (this benchmark needs Linux)")


def child(preset: str, shape: tuple[int, ...], routing: str, folder: str, threads: int = 0) -> dict:
    """Runs in the subprocess: load a model, segment one int16 volume, report memory figures in bytes."""
    import time

    import numpy as np
    import torch

    from napari_dmoe.io.checkpoint import load_model, save_model
    from napari_dmoe.inference.engine import segment
    from napari_dmoe.model import build_network, make_spec

    if threads:
        torch.set_num_threads(threads)
    spec = make_spec(preset, "stage", ["T1", "T2", "T3", "T4"], ["background", "CTV"])
    torch.manual_seed(0)
    path = Path(folder) / f"{preset}.safetensors"
    if not path.exists():
        save_model(path, build_network(spec).eval(), spec)
    model = load_model(path)
    image = np.random.default_rng(0).integers(-1000, 1000, size=shape, dtype=np.int16)
    before = vm("VmRSS")
    start = time.perf_counter()
    seg = segment(model, image, "T3", device="cpu", routing=routing)
    seconds = time.perf_counter() - start
    outputs = seg.labels.nbytes + seg.probabilities.nbytes + sum(m.nbytes for m in seg.routing.values())
    outputs += seg.dominant_expert.nbytes if seg.dominant_expert is not None else 0
    return {"shape": "x".join(map(str, shape)), "voxels": int(np.prod(shape)), "before": before,
            "peak": vm("VmHWM"), "outputs": outputs, "image": image.nbytes, "seconds": seconds,
            "maps": sorted(seg.routing)}


def measure(preset: str, shape: tuple[int, ...], routing: str, folder: str, threads: int = 0) -> dict:
    code = ("import json, sys; sys.path.insert(0, %r); import bench_memory as b; "
            "print(json.dumps(b.child(%r, %r, %r, %r, %r)))") % (str(Path(__file__).parent), preset, shape, routing,
                                                                 folder, threads)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"the {shape} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny preset and volumes, seconds")
    parser.add_argument("--routing", default="auto", help="segment(routing=...): auto, mean, all, none")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads in each run (default: torch's)")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        runs = [measure(cfg["preset"], s, args.routing, tmp, args.threads) for s in cfg["sizes"]]
    rows = []
    for r in runs:
        r["beyond"] = r["peak"] - r["outputs"]
        rows.append([r["shape"], r["voxels"], r["before"] / MB, r["peak"] / MB, r["outputs"] / MB,
                     r["beyond"] / MB, (r["peak"] - r["before"] - r["outputs"]) / r["voxels"], r["seconds"],
                     ",".join(r["maps"])])
    print(f"MiB; preset {cfg['preset']} (fresh init), int16 image, routing={args.routing!r}; "
          "working = (peak - before - outputs) per voxel")
    print(table(["shape (z,y,x)", "voxels", "before", "peak", "outputs", "beyond outputs", "working B/vox", "s",
                 "maps"], rows))
    small, large = runs[0], runs[-1]
    ratio = large["beyond"] / small["beyond"]
    print(summary({"bench": "memory", "quick": int(args.quick), "routing": args.routing,
                   "small_beyond_mib": small["beyond"] / MB, "large_beyond_mib": large["beyond"] / MB,
                   "large_peak_mib": large["peak"] / MB, "large_outputs_mib": large["outputs"] / MB,
                   "ratio": ratio, "goal_met": int(ratio <= 1.5)}))


if __name__ == "__main__":
    main()
