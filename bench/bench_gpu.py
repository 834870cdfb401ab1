"""GPU inference figures for bench/gpu.sh: 2D and 3D ``segment`` latency with and without AMP, peak GPU memory.

    python bench/bench_gpu.py                        # CUDA, paper and small presets
    python bench/bench_gpu.py --device cpu --quick   # check the script itself on a CPU, tiny presets

Goal: 3D 256x256x128 dMoE inference (resunet3d-paper, 128x256x256 z,y,x) under 1 s on an H100-class card.
Freshly initialised models unless the bundled demo models exist (latency does not depend on the weights).
Last line: ``key=value``.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import machine, summary, table  # noqa: E402
from bench_inference import STAGES, Case, run_case  # noqa: E402

FULL = [Case("2d-small", "fundus-dmoe", "transunet2d-small", (512, 512), "Black", 0.3),
        Case("2d-paper", "", "transunet2d-paper", (512, 512), "Black", 0.3),
        Case("3d-small", "prostate-dmoe", "resunet3d-small", (64, 128, 128), "T3", 3.0),
        Case("3d-paper", "", "resunet3d-paper", (128, 256, 256), "T3", 1.0)]
QUICK = [Case("2d-tiny", "", "transunet2d-tiny", (96, 96), "Black", 0.3),
         Case("3d-tiny", "", "resunet3d-tiny", (64, 64, 64), "T3", 1.0)]


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    from _util import cpu_name

    return f"CPU: {cpu_name()}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny presets, seconds")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per case (default 5, quick 1)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("bench_gpu: no CUDA device visible; run with --device cpu --quick to check the script")
    repeats = args.repeats or (1 if args.quick else 5)
    card = device_name(args.device)
    print(f"device: {card}")
    print(f"machine: {machine()}")
    rows, out = [], {"bench": "gpu", "quick": int(args.quick), "card": card}
    amps = (False, True) if args.device.startswith("cuda") else (False,)  # AMP is CUDA-only in the engine
    with tempfile.TemporaryDirectory() as tmp:
        for case in QUICK if args.quick else FULL:
            for amp in amps:
                r = run_case(case, Path(tmp), repeats, args.quick, routing=True, device=args.device, amp=amp)
                peak = r.get("gpu_peak_mib", float("nan"))
                rows.append([case.name, case.preset, r["shape"], "fp16" if amp else "fp32",
                             *[r[s] for s in STAGES], r["total"], peak])
                tag = f"{case.name.replace('-', '_')}_{'amp' if amp else 'fp32'}"
                out.update({f"{tag}_s": r["total"], f"{tag}_gpu_mib": peak})
                if case.name == "3d-paper" and amp:
                    out["goal_3d_1s_met"] = int(r["total"] < 1.0)
    print(f"seconds, median of {repeats} runs after a warm-up (model load excluded); peak GPU memory in MiB")
    print(table(["case", "preset", "shape", "precision", *STAGES, "total", "gpu peak MiB"], rows))
    print(summary(out))


if __name__ == "__main__":
    main()
