#!/usr/bin/env python
"""``load_model`` of the bundled models: one build (the meta build takes the file's tensors, issue 27) against the
previous two (meta build for the size bound, then a real build with random init and a copy of the weights).

    python bench/bench_model_load.py [--runs 9] [--threads 1]

Interleaved runs in this process after a warm-up (imports excluded); median and range in ms. Last line:
key=value pairs.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _util import machine, summary, table  # noqa: E402

MODELS = HERE.parent / "napari_dmoe" / "assets" / "models"


def two_builds(path: Path) -> torch.nn.Module:
    """The load before issue 27, from the same checks."""
    from safetensors.torch import load_file

    from napari_dmoe.io import checkpoint as ck
    from napari_dmoe.model import build_network

    spec = ck.read_spec(path)
    ck._check_network_size(path, spec)
    tensors = load_file(str(path))
    ck._check_finite(path, tensors)
    network = build_network(spec)
    network.load_state_dict(ck._match_weights(path, network, tensors), strict=True)
    return network.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier on a shared machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from napari_dmoe.io.checkpoint import load_model

    rows, results = [], {}
    for name in ("fundus-dmoe", "prostate-dmoe", "skin-dmoe"):
        path = MODELS / f"{name}.safetensors"
        two_builds(path), load_model(path)  # warm-up
        times: dict[str, list[float]] = {"two": [], "one": []}
        for _ in range(args.runs):
            for key, fn in (("two", two_builds), ("one", load_model)):
                t = time.perf_counter()
                fn(path)
                times[key].append((time.perf_counter() - t) * 1000)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append([name, med["two"], f"{min(times['two']):.0f}-{max(times['two']):.0f}", med["one"],
                     f"{min(times['one']):.0f}-{max(times['one']):.0f}", med["two"] / med["one"]])
        results[f"{name.split('-')[0]}_two_over_one"] = med["two"] / med["one"]
    print(f"machine: {machine()}; {args.runs} interleaved runs")
    print(table(["model", "two builds ms", "range", "one build ms", "range", "two/one"], rows))
    print(summary({"bench": "model_load", **results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
