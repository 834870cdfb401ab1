"""Parameters and FLOPs of baseline, MoE, dMoE and one-model-per-group, counted with torch's FlopCounterMode.

    python bench/bench_flops.py            # paper presets: 2D TransUNet 224 (3 groups), 3D UNet 96^3 (4 stages T1-T4)
    python bench/bench_flops.py --quick    # tiny presets, seconds

FLOPs are for one forward pass of one image in eval mode (2 FLOPs per multiply-add, as FlopCounterMode counts).
Our dMoE runs only the top-k of E experts per token, so the counted expert FLOPs are the active ones; routers add
parameters (2 x Linear(C, E) per attribute value) but few FLOPs. One model per group costs G x the baseline's
parameters and the baseline's FLOPs per image. Last line: ``key=value``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import machine, summary, table  # noqa: E402

from napari_dmoe.model import build_network, make_spec  # noqa: E402
from napari_dmoe.model.moe import DMoE  # noqa: E402

GROUPS = {"2d": ("race", ["Asian", "Black", "White"]), "3d": ("stage", ["T1", "T2", "T3", "T4"])}
FULL = {"2d": "transunet2d-paper", "3d": "resunet3d-paper"}
QUICK = {"2d": "transunet2d-tiny", "3d": "resunet3d-tiny"}


def count(preset: str, kind: str, routing: str) -> dict[str, float]:
    """Parameters (total, experts, routers) and forward GFLOPs of one network on one input of its input_size."""
    name, values = GROUPS[kind]
    spec = make_spec(preset, name, values, ["background", "foreground"], routing=routing)
    torch.manual_seed(0)
    net = build_network(spec).eval()
    moe = [m for m in net.modules() if isinstance(m, DMoE)]
    experts = sum(p.numel() for m in moe for p in m.experts.parameters())
    routers = sum(p.numel() for m in moe for p in m.routers.parameters())
    x = torch.randn(1, spec.in_channels, *spec.input_size)
    attr = torch.tensor([len(values) - 1 if routing == "dmoe" else 0])
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        net(x, attr)
    return {"params_m": sum(p.numel() for p in net.parameters()) / 1e6, "experts_m": experts / 1e6,
            "routers_m": routers / 1e6, "gflops": counter.get_total_flops() / 1e9,
            "input": "x".join(map(str, spec.input_size)), "top_k": spec.top_k, "n_experts": spec.n_experts}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny presets, seconds")
    args = parser.parse_args(argv)
    presets = QUICK if args.quick else FULL
    print(f"machine: {machine()}")
    rows, out = [], {"bench": "flops", "quick": int(args.quick)}
    for kind, preset in presets.items():
        groups = len(GROUPS[kind][1])
        figures = {r: count(preset, kind, r) for r in ("none", "moe", "dmoe")}
        base = figures["none"]
        figures["per-group"] = dict(base, params_m=groups * base["params_m"])
        labels = {"none": "baseline", "moe": "MoE", "dmoe": "dMoE", "per-group": f"{groups} models (one per group)"}
        for key, f in figures.items():
            rows.append([kind, preset, f["input"], labels[key], f["params_m"], f["experts_m"], f["routers_m"],
                         f["gflops"], f["params_m"] / base["params_m"], f["gflops"] / base["gflops"]])
        dmoe = figures["dmoe"]
        out.update({f"{kind}_base_params_m": base["params_m"], f"{kind}_dmoe_params_m": dmoe["params_m"],
                    f"{kind}_pergroup_params_m": figures["per-group"]["params_m"],
                    f"{kind}_base_gflops": base["gflops"], f"{kind}_dmoe_gflops": dmoe["gflops"],
                    f"{kind}_dmoe_vs_pergroup_params": dmoe["params_m"] / figures["per-group"]["params_m"]})
    print(f"one image per forward; experts active per token: top_k={dmoe['top_k']} of {dmoe['n_experts']}")
    print(table(["kind", "preset", "input", "model", "params (M)", "experts (M)", "routers (M)", "GFLOPs",
                 "params x base", "FLOPs x base"], rows))
    print(summary(out))


if __name__ == "__main__":
    main()
