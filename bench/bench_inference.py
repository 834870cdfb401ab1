"""End-to-end CPU latency of ``napari_dmoe.segment`` per stage: load, preprocess, infer, routing maps, postprocess.

    python bench/bench_inference.py            # 512x512 2D (transunet2d-small), 64x128x128 3D (resunet3d-small)
    python bench/bench_inference.py --quick    # tiny presets and images, seconds

Uses the bundled demo models when they exist, else freshly initialised models of the same presets (latency does
not depend on the weights), saved to a temporary safetensors file so that loading is measured for real.
Median of ``--repeats`` runs after one warm-up; the total excludes model loading. Last line: ``key=value``.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import machine, median, summary, table  # noqa: E402

from napari_dmoe.io.checkpoint import load_model, save_model  # noqa: E402
from napari_dmoe.inference.engine import segment  # noqa: E402
from napari_dmoe.model import build_network, make_spec  # noqa: E402

MODELS = Path(__file__).resolve().parents[1] / "napari_dmoe" / "assets" / "models"
STAGES = ("preprocess", "infer", "routing", "postprocess")


@dataclass
class Case:
    name: str
    demo_file: str  # bundled trained model to prefer
    preset: str
    shape: tuple[int, ...]  # napari order: (y, x) or (z, y, x)
    attribute: str
    goal_s: float


FULL = [Case("2d", "fundus-dmoe", "transunet2d-small", (512, 512), "Black", 0.3),
        Case("3d", "prostate-dmoe", "resunet3d-small", (64, 128, 128), "T3", 3.0)]
QUICK = [Case("2d", "fundus-dmoe", "transunet2d-tiny", (96, 96), "Black", 0.3),
         Case("3d", "prostate-dmoe", "resunet3d-tiny", (64, 64, 64), "T3", 3.0)]


def model_file(case: Case, folder: Path, quick: bool) -> tuple[Path, str]:
    """The demo model (if bundled and not --quick) or a fresh model of the preset written to ``folder``."""
    demo = MODELS / f"{case.demo_file}.safetensors"
    if demo.is_file() and not quick:
        return demo, f"{case.demo_file} (trained demo model)"
    if case.preset.startswith("transunet"):
        spec = make_spec(case.preset, "race", ["Asian", "Black", "White"], ["background", "rim", "cup"])
    else:
        spec = make_spec(case.preset, "stage", ["T1", "T2", "T3", "T4"], ["background", "CTV"])
    torch.manual_seed(0)
    path = folder / f"{case.preset}.safetensors"
    save_model(path, build_network(spec).eval(), spec)
    return path, f"{case.preset} (fresh init)"


def run_case(case: Case, folder: Path, repeats: int, quick: bool, routing: bool, device: str = "cpu",
             amp: bool = True, channels_last: bool = False, compile: bool = False) -> dict[str, float | str]:
    """Median seconds per stage of ``segment`` on one case; on CUDA also the peak GPU memory (MiB).
    ``first`` is the warm-up call (with ``compile``, the compilation)."""
    path, label = model_file(case, folder, quick)
    image = np.random.default_rng(0).normal(100, 20, size=case.shape).astype(np.float32)
    loads, stages = [], {s: [] for s in STAGES}
    totals, walls = [], []
    opts = dict(device=device, routing=routing, amp=amp, channels_last=channels_last, compile=compile)
    model = load_model(path, device=device)  # the network lives on the device: no weight copies per call
    start = time.perf_counter()
    warm = segment(model, image, case.attribute, **opts)  # warm-up (allocator, kernels, compilation)
    first = time.perf_counter() - start
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats):
        start = time.perf_counter()
        load_model(path, device=device)  # timed only: segmenting with the warm model keeps its compiled form
        loads.append(time.perf_counter() - start)
        start = time.perf_counter()
        seg = segment(model, image, case.attribute, **opts)  # returns numpy arrays: already synchronised
        walls.append(time.perf_counter() - start)
        for s in STAGES:
            stages[s].append(seg.timings[s])
        totals.append(sum(seg.timings[s] for s in STAGES))
    result: dict[str, float | str] = {"case": case.name, "model": label, "shape": "x".join(map(str, case.shape))}
    result["load"] = median(loads)
    result.update({s: median(v) for s, v in stages.items()})
    result["total"] = median(totals)
    result["wall"] = median(walls)  # segment() as the caller sees it, including bookkeeping outside the stages
    result["goal"] = case.goal_s
    result["first"] = first
    result["warnings"] = "; ".join(warm.warnings)
    if device.startswith("cuda"):
        result["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny presets and images, seconds")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per case (default 5, quick 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-routing", action="store_true", help="skip routing maps (routing=False)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (2 if args.quick else 5)
    cases = QUICK if args.quick else FULL
    print(f"machine: {machine()}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            results.append(run_case(case, Path(tmp), repeats, args.quick, not args.no_routing))
    cols = ["case", "model", "shape", "load", *STAGES, "total", "wall", "goal"]
    print(f"seconds, median of {repeats} runs after a warm-up; total = stages without load")
    print(table(cols, [[r[c] for c in cols] for r in results]))
    out: dict[str, object] = {"bench": "inference", "quick": int(args.quick)}
    for r in results:
        n = r["case"]
        out.update({f"{n}_load_s": r["load"], f"{n}_infer_s": r["infer"], f"{n}_routing_s": r["routing"],
                    f"{n}_total_s": r["total"], f"{n}_goal_met": int(r["total"] < r["goal"])})
    print(summary(out))


if __name__ == "__main__":
    main()
