"""Time to first mask as a user sees it, imports and model load included, on 2 CPU cores, for the 2D (fundus,
224x224) and 3D (prostate CT, 128x128x64 voxels) demo models:

- CLI: wall time of a fresh ``dmoe segment MODEL SAMPLE -a VALUE -o OUT`` process; and, in another fresh process,
  the work alone (model load + read + inference + write, after the imports), for the ratio CLI / work.
- widget: a fresh napari viewer under xvfb with the sample open and the Segment widget docked; time from the
  Segment click to the mask layer appearing (the click pays the engine's imports and the model load), then a
  second click (the widget's model cache is warm).

    python bench/bench_first_mask.py                 # 5 runs each; prints medians and min-max
    python bench/bench_first_mask.py --runs 3 --no-gui

Every process is pinned to CPUs 0-1 (taskset semantics via sched_setaffinity) with 2 torch threads.
Goals: 2D < 3 s, 3D < 10 s, CLI wall <= 1.5x work. Last line: key=value pairs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = HERE.parent / "napari_dmoe" / "assets" / "models"
CPUS = {0, 1}
CASES = {  # name: (model file, sample writer key, attribute value, goal in seconds)
    "2d": ("fundus-dmoe.safetensors", "fundus", "Black", 3.0),
    "3d": ("prostate-dmoe.safetensors", "prostate", "T3", 10.0),
}


def _pin() -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, CPUS & os.sched_getaffinity(0) or os.sched_getaffinity(0))


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}


def write_samples(folder: Path) -> dict[str, Path]:
    """The napari demo samples as files: fundus PNG (race Black) and a 128x128x64 prostate CT NIfTI (T3)."""
    import imageio.v3 as iio

    from napari_dmoe.io.images import write_volume
    from napari_dmoe.plugin.samples import SAMPLE_SEED
    from napari_dmoe.synthetic import make_fundus, make_prostate

    fundus = folder / "fundus.png"
    iio.imwrite(fundus, make_fundus(SAMPLE_SEED, race="Black", size=224).image)
    image, _, spacing = make_prostate(SAMPLE_SEED, stage="T3", shape=(128, 128, 64)).napari_order()
    prostate = write_volume(folder / "prostate.nii.gz", image, spacing)
    return {"fundus": fundus, "prostate": prostate}


# -- the measured processes ----------------------------------------------------------------------------------
def phases(model: str, sample: str, value: str, out: str) -> dict[str, float]:
    """The CLI's work step by step in this (fresh) process: imports, then load + read + inference + write."""
    t = time.perf_counter()
    from napari_dmoe.inference.engine import segment
    from napari_dmoe.io.checkpoint import load_model
    from napari_dmoe.io.images import read_image, write_labels

    times = {"imports": time.perf_counter() - t}
    t = time.perf_counter()
    m = load_model(model)
    times["load"] = time.perf_counter() - t
    t = time.perf_counter()
    volume = read_image(sample)
    times["read"] = time.perf_counter() - t
    t = time.perf_counter()
    seg = segment(m, volume.array, value, spacing=volume.spacing, device="cpu", rgb=volume.rgb)
    times["inference"] = time.perf_counter() - t
    t = time.perf_counter()
    write_labels(out, seg.labels, like=volume)
    times["write"] = time.perf_counter() - t
    return times


def gui(model: str, sample: str, value: str) -> dict[str, float]:
    """Seconds from the Segment click to the mask layer, cold (first click) and warm (second click)."""
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_dmoe.io.images import read_image

    volume = read_image(sample)
    viewer = napari.Viewer(show=True)
    name = "dmoe_attributes"
    attribute = {"race" if volume.array.ndim == 2 else "stage": value}
    viewer.add_image(volume.array, name="sample", scale=volume.spacing, metadata={name: attribute})
    _, widget = viewer.window.add_plugin_dock_widget("napari-dmoe", "Segment (dMoE)")
    widget.models.set_path(model)
    widget.devices.combo.setCurrentIndex(widget.devices.combo.findData("cpu"))
    app = QApplication.instance()
    out = {}
    def masks() -> int:
        return sum(layer.metadata.get("dmoe", {}).get("kind") == "mask" for layer in viewer.layers)

    for key in ("click_cold", "click_warm"):
        for layer in [la for la in viewer.layers if "dmoe" in la.metadata]:  # else the second mask replaces the first
            viewer.layers.remove(layer)
        before = masks()
        t = time.perf_counter()
        widget.run_button.click()
        while masks() == before:  # result layers go above their image, not necessarily last
            app.processEvents()
            if time.perf_counter() - t > 120:
                raise TimeoutError(f"no mask layer after 120 s; the widget says: {widget.status.text()!r}")
            time.sleep(0.002)
        out[key] = time.perf_counter() - t
        while widget.worker is not None:  # let the job finish before the next click
            app.processEvents()
            time.sleep(0.002)
    viewer.close()
    return out


# -- the driver ------------------------------------------------------------------------------------------------
def _child(*args: str, xvfb: bool = False) -> tuple[float, str]:
    cmd = [sys.executable, *args]
    if xvfb:
        cmd = ["xvfb-run", "-a", "-s", "-screen 0 1280x1024x24", *cmd]
    t = time.perf_counter()
    proc = subprocess.run(cmd, check=False, env=_env(), capture_output=True, text=True, preexec_fn=_pin, timeout=600)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return wall, proc.stdout


def _spread(values: list[float]) -> str:
    from _util import median

    return f"{median(values):.2f} s ({min(values):.2f}-{max(values):.2f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-gui", action="store_true", help="skip the widget measurement")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--phases", nargs=4, metavar=("MODEL", "SAMPLE", "VALUE", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--gui", nargs=3, metavar=("MODEL", "SAMPLE", "VALUE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phases:
        print(json.dumps(phases(*args.phases)))
        return 0
    if args.gui:
        print(json.dumps(gui(*args.gui)))
        return 0
    sys.path.insert(0, str(HERE))
    from _util import machine, median, summary

    print(f"machine: {machine()} (load before: {os.getloadavg()[0]:.2f})")
    folder = Path(tempfile.mkdtemp(prefix="dmoe-first-mask-"))
    samples = write_samples(folder)
    results: dict[str, float] = {}
    for case in args.cases:
        model_file, sample_key, value, goal = CASES[case]
        model, sample = str(MODELS / model_file), str(samples[sample_key])
        suffix = ".png" if case == "2d" else ".nii.gz"
        cli, work, parts, cold, warm = [], [], [], [], []
        for run in range(args.runs):
            # --force: the time of the work. The fit check (issue 23) refuses the 128x128x64 prostate sample, and
            # rightly: the model was trained on 96x96x32 volumes and scores Dice 0.18 on it
            wall, _ = _child("-m", "napari_dmoe.cli.main", "segment", model, sample, "-a", value, "-o",
                             str(folder / f"cli{case}{run}{suffix}"), "--device", "cpu", "-q", "--force")
            cli.append(wall)
            _, text = _child(str(Path(__file__).resolve()), "--phases", model, sample, value,
                             str(folder / f"ph{case}{run}{suffix}"))
            p = json.loads(text.strip().splitlines()[-1])
            parts.append(p)
            work.append(p["load"] + p["read"] + p["inference"] + p["write"])
            if not args.no_gui:
                _, text = _child(str(Path(__file__).resolve()), "--gui", model, sample, value, xvfb=True)
                g = json.loads(text.strip().splitlines()[-1])
                cold.append(g["click_cold"])
                warm.append(g["click_warm"])
        ratio = [c / w for c, w in zip(cli, work)]
        print(f"\n{case} ({Path(sample).name}, {model_file}), {args.runs} runs, median (min-max):")
        print(f"  CLI wall            {_spread(cli)}   goal < {goal:.0f} s")
        for key in ("imports", "load", "read", "inference", "write"):
            print(f"    {key:<17} {_spread([p[key] for p in parts])}")
        print(f"  work (load+read+inference+write) {_spread(work)}; CLI / work {median(ratio):.2f} "
              f"({min(ratio):.2f}-{max(ratio):.2f}), goal <= 1.5")
        results.update({f"{case}_cli_s": median(cli), f"{case}_work_s": median(work), f"{case}_ratio": median(ratio)})
        if cold:
            print(f"  widget click -> mask, first  {_spread(cold)}   goal < {goal:.0f} s")
            print(f"  widget click -> mask, again  {_spread(warm)}   (cached model)")
            results.update({f"{case}_click_s": median(cold), f"{case}_click_warm_s": median(warm)})
    print(f"(load after: {os.getloadavg()[0]:.2f})")
    print(summary({**results, "runs": args.runs}))
    return 0


if __name__ == "__main__":
    _pin()
    sys.exit(main())
