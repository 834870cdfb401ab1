"""GPU inference figures for bench/gpu.sh: 2D and 3D ``segment`` latency per speed option, peak GPU memory.

    python bench/bench_gpu.py                                  # CUDA: fp32, AMP, AMP + channels-last
    python bench/bench_gpu.py --variants compile --cases 3d-paper,2d-paper   # torch.compile (slow first call)
    python bench/bench_gpu.py --device cpu                     # the same options on a CPU, small presets
    python bench/bench_gpu.py --device cpu --quick             # check the script itself, tiny presets

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


VARIANTS = {  # name -> segment() options; AMP is CUDA-only in the engine, so on a CPU "amp" equals "fp32"
    "fp32": dict(amp=False),
    "amp": dict(amp=True),
    "cl": dict(amp=True, channels_last=True),
    "compile": dict(amp=True, compile=True),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny presets, seconds")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per case (default 5, quick 1)")
    parser.add_argument("--variants", default=None,
                        help=f"comma list of {','.join(VARIANTS)} (default: fp32,amp,cl on CUDA, fp32,cl on a CPU)")
    parser.add_argument("--cases", default=None, help="comma list of case names (default: all; on a CPU the "
                        "paper presets are left out)")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("bench_gpu: no CUDA device visible; run with --device cpu --quick to check the script")
    variants = (args.variants or ("fp32,amp,cl" if cuda else "fp32,cl")).split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"bench_gpu: unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    cases = QUICK if args.quick else [c for c in FULL if cuda or "paper" not in c.preset]
    if args.cases:
        cases = [c for c in QUICK + FULL if c.name in args.cases.split(",")]
    repeats = args.repeats or (1 if args.quick else 5)
    card = device_name(args.device)
    print(f"device: {card}")
    print(f"machine: {machine()}")
    rows, out = [], {"bench": "gpu", "quick": int(args.quick), "card": card}
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            for variant in variants:
                r = run_case(case, Path(tmp), repeats, args.quick, routing=True, device=args.device,
                             **VARIANTS[variant])
                peak = r.get("gpu_peak_mib", float("nan"))
                rows.append([case.name, case.preset, r["shape"], variant, r["first"], *[r[s] for s in STAGES],
                             r["total"], peak, r["warnings"] or "-"])
                tag = f"{case.name.replace('-', '_')}_{variant}"
                out.update({f"{tag}_s": r["total"], f"{tag}_first_s": r["first"], f"{tag}_gpu_mib": peak})
                if case.name == "3d-paper" and variant == "amp":
                    out["goal_3d_1s_met"] = int(r["total"] < 1.0)
    print(f"seconds, median of {repeats} runs after a warm-up ('first' = the warm-up call, which compiles with "
          "'compile'); model load excluded; peak GPU memory in MiB")
    print("variants: fp32; amp = float16 autocast (CUDA); cl = amp + channels-last; compile = amp + torch.compile")
    print(table(["case", "preset", "shape", "variant", "first", *STAGES, "total", "gpu peak MiB", "warnings"], rows))
    print(summary(out))


if __name__ == "__main__":
    main()
