"""Benchmark the dMoE layer: grouped dispatch (ours) vs the official per-sample loop vs dense all-experts.

    python bench/bench_moe_layer.py            # transformer and voxel-token sizes
    python bench/bench_moe_layer.py --quick    # small sizes, a few seconds
    python bench/bench_moe_layer.py --device cuda
    python bench/bench_moe_layer.py --train --threads 1   # forward + backward: gather dispatch vs scatter-add

Eval mode (no noise, no dropout). Prints a table and, as the last line, ``key=value`` pairs. ``--train`` times
forward + backward with autograd (no noise, no dropout, so every column computes the same numbers) of ours (the
gather-only training dispatch), ``scatter`` (the same layer through index_select / index_add_, the dispatch before
issue 27) and the official loop; the ``dense`` column then holds the scatter times.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from napari_dmoe.model import moe as moe_module
from napari_dmoe.model.moe import DMoE
from napari_dmoe.model.reference import dense_dmoe, loop_dmoe

# (name, batch, tokens per sample, channels)
FULL = [("vit384", 8, 196, 384), ("vit768", 8, 196, 768), ("vox24", 2, 100_000, 24), ("vox48", 2, 100_000, 48)]
QUICK = [("vit64", 4, 64, 64), ("vox16", 2, 4_096, 16)]


SPREAD: dict[str, tuple[float, float]] = {}  # (min, max) ms of the last timed() call, printed with --spread


def timed(fns: dict, device: str, repeats: int) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Median ms per function. Runs are interleaved so that load from other processes hits all alike."""
    outs = {name: fn() for name, fn in fns.items()}  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            outs[name] = fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - start) * 1000)
    SPREAD.clear()
    SPREAD.update({name: (min(t), max(t)) for name, t in times.items()})
    return {name: statistics.median(t) for name, t in times.items()}, outs


def run_case(batch: int, tokens: int, dim: int, n_attr: int, device: str, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    moe = DMoE(dim, n_attr).to(device).eval()
    x = torch.randn(batch, tokens, dim, device=device)
    attr = torch.arange(batch, device=device) % n_attr
    fns = {"ours": lambda: moe(x, attr), "loop": lambda: loop_dmoe(moe, x, attr),
           "dense": lambda: dense_dmoe(moe, x, attr)}
    with torch.inference_mode():
        ms, out = timed(fns, device, repeats)
    diff = max((out["ours"] - out["loop"]).abs().max().item(), (out["ours"] - out["dense"]).abs().max().item())
    return {"ours_ms": ms["ours"], "loop_ms": ms["loop"], "dense_ms": ms["dense"], "max_abs_diff": diff}


def run_train_case(batch: int, tokens: int, dim: int, n_attr: int, device: str, repeats: int) -> dict[str, float]:
    """Forward + backward, interleaved: ours (gather dispatch), scatter (index_add_ dispatch), the official loop."""
    torch.manual_seed(0)
    moe = DMoE(dim, n_attr, dropout=0.0).to(device).eval()  # eval: no noise; autograd is on all the same
    x = torch.randn(batch, tokens, dim, device=device, requires_grad=True)
    attr = torch.arange(batch, device=device) % n_attr
    grad = torch.randn(batch, tokens, dim, device=device)

    def step(forward, gather: bool):
        def fn() -> torch.Tensor:
            moe_module.GATHER_IN_TRAINING = gather
            moe.zero_grad(set_to_none=True)
            x.grad = None
            forward().backward(grad)
            return x.grad.clone()
        return fn

    fns = {"ours": step(lambda: moe(x, attr), True), "scatter": step(lambda: moe(x, attr), False),
           "loop": step(lambda: loop_dmoe(moe, x, attr), True)}
    try:
        ms, out = timed(fns, device, repeats)
    finally:
        moe_module.GATHER_IN_TRAINING = True
    diff = max((out["ours"] - out["loop"]).abs().max().item(), (out["ours"] - out["scatter"]).abs().max().item())
    return {"ours_ms": ms["ours"], "loop_ms": ms["loop"], "dense_ms": ms["scatter"], "max_abs_diff": diff}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, seconds")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--routers", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--cases", default=None, help="comma-separated case names to run (default: all)")
    parser.add_argument("--train", action="store_true",
                        help="forward + backward; the third column is the scatter-add dispatch, not dense")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = QUICK if args.quick else FULL
    if args.cases:
        cases = [c for c in FULL + QUICK if c[0] in args.cases.split(",")]
    repeats = args.repeats or (3 if args.quick else 7)

    print(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} repeats={repeats}")
    header = f"{'case':8} {'B':>3} {'N':>7} {'C':>4} {'ours ms':>9} {'loop ms':>9} {'dense ms':>9} "
    if args.train:
        header = header.replace("dense ms", "scat. ms")
    print(header + f"{'loop/ours':>9} {'ours/dense':>10} {'max diff':>9}  range ours, loop, third (ms)")
    summary = [f"bench=moe_layer{'_train' if args.train else ''} device={args.device} threads={torch.get_num_threads()} repeats={repeats}"]
    third = "scatter" if args.train else "dense"
    for name, b, n, c in cases:
        r = (run_train_case if args.train else run_case)(b, n, c, args.routers, args.device, repeats)
        speedup, dense_ratio = r["loop_ms"] / r["ours_ms"], r["ours_ms"] / r["dense_ms"]
        print(
            f"{name:8} {b:>3} {n:>7} {c:>4} {r['ours_ms']:>9.2f} {r['loop_ms']:>9.2f} {r['dense_ms']:>9.2f} "
            f"{speedup:>9.2f} {dense_ratio:>10.2f} {r['max_abs_diff']:>9.1e}  "
            + ", ".join(f"{SPREAD[k][0]:.0f}-{SPREAD[k][1]:.0f}" for k in ("ours", "loop", third))
        )
        summary.append(f"{name}_ours_ms={r['ours_ms']:.2f} {name}_loop_over_ours={speedup:.2f} "
                       f"{name}_ours_over_dense={dense_ratio:.2f} {name}_maxdiff={r['max_abs_diff']:.1e}")
    print(" ".join(summary))


if __name__ == "__main__":
    main()
