"""Longest Qt event-loop stall in napari while the Fine-tune widget trains a model in a subprocess.

A 10 ms QTimer on the GUI thread records the gaps between its ticks (``StallMeter``); the same meter runs first
with the viewer idle for the same time, which shows what the machine alone costs. Also reported: the time the
GUI thread spent in the Start click, in the widget's 200 ms poll and in showing a new plot image (the matplotlib
render itself runs in a background thread; its time is listed too).

    xvfb-run -a python bench/bench_finetune_stall.py --quick     # tiny model, 3 steps (checks the script)
    xvfb-run -a python bench/bench_finetune_stall.py             # small model, 40 steps
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RACES = ["Asian", "Black", "White"]


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="ascii"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _pump(app, seconds: float, until=None) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end and not (until and until()):
        app.processEvents()
        time.sleep(0.001)


def _timed(stats: dict, key: str, fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            stats[key].append(time.perf_counter() - t0)
    return wrapper


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, 3 steps")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--pairs", type=int, default=6)
    args = parser.parse_args()
    steps = args.steps or (3 if args.quick else 40)
    preset, size = ("transunet2d-tiny", 64) if args.quick else ("transunet2d-small", 128)

    import napari
    import torch

    from napari_dmoe.plugin.widgets.finetune_widget import FinetuneWidget
    from napari_dmoe.io.checkpoint import save_model
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from stall_meter import StallMeter
    from napari_dmoe.model import build_network, make_spec

    tmp = Path(tempfile.mkdtemp(prefix="dmoe-stall-"))
    os.environ.setdefault("NAPARI_DMOE_CONFIG_DIR", str(tmp / "config"))
    torch.manual_seed(0)
    spec = make_spec(preset, "race", RACES, ["background", "disc"])
    base = save_model(tmp / "base.safetensors", build_network(spec), spec)
    viewer = napari.Viewer(show=True)
    app = napari.qt.get_qapp()
    rng = np.random.default_rng(0)
    widget = FinetuneWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Fine-tune (dMoE)")
    for i in range(args.pairs):
        labels = np.zeros((size, size), np.int32)
        labels[size // 4:3 * size // 4, size // 4 + i:3 * size // 4] = 1
        viewer.add_image(rng.normal(0, 1, (size, size)).astype(np.float32) + 2 * labels, name=f"scan{i}",
                         metadata={"dmoe_attributes": {"race": RACES[i % 3]}})
        viewer.add_labels(labels, name=f"scan{i} truth")
    widget.models.set_path(base)
    widget.output.setText(str(tmp / "runs"))
    widget.devices.combo.setCurrentIndex(widget.devices.combo.findData("cpu"))
    for i in range(args.pairs):
        widget.add_pair(image=f"scan{i}", labels=f"scan{i} truth")
    widget.settings.steps.setValue(steps)
    widget.settings.batch.setValue(2)
    _pump(app, 1.0)

    stats: dict[str, list[float]] = {"poll": [], "draw": [], "start": []}
    widget.timer.timeout.disconnect()
    widget.timer.timeout.connect(_timed(stats, "poll", widget.poll))
    stats["render"] = []
    widget.plot._show_result = _timed(stats, "draw", widget.plot._show_result)  # GUI thread: show the image
    widget.plot._render = _timed(stats, "render", widget.plot._render)  # background thread: matplotlib
    widget.plot._collect.timeout.disconnect()
    widget.plot._collect.timeout.connect(widget.plot._show_result)

    meter = StallMeter()
    t0 = time.monotonic()
    meter.start()
    _timed(stats, "start", widget.start)()
    _pump(app, 1200, until=lambda: widget.phase != "train")
    meter.stop()
    train_s = time.monotonic() - t0
    _pump(app, 600, until=lambda: widget.process is None)
    ok = widget.new_model is not None

    idle = StallMeter()
    idle.start()
    _pump(app, min(train_s, 30))
    idle.stop()

    gaps = np.array(meter.gaps) * 1000 - 10
    idle_gaps = np.array(idle.gaps) * 1000 - 10
    print(f"machine: {_cpu_name()}, {os.cpu_count()} cores; Python {platform.python_version()}, "
          f"torch {torch.__version__}, napari {napari.__version__}; Qt platform {app.platformName()}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}; model {preset}, {args.pairs} pairs "
          f"{size}x{size}, {steps} steps; run {'finished' if ok else 'FAILED: ' + widget.status.text()}")
    print("| phase | seconds | ticks | longest stall ms | p99 stall ms | Start click ms | poll max ms | plot update max ms | plot render (thread) max ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| training | {train_s:.1f} | {len(gaps)} | {meter.longest_stall_ms:.0f} | "
          f"{np.percentile(gaps, 99):.0f} | {stats['start'][0] * 1000:.0f} | {max(stats['poll'], default=0) * 1000:.0f} | "
          f"{max(stats['draw'], default=0) * 1000:.0f} | {max(stats['render'], default=0) * 1000:.0f} |")
    print(f"| idle viewer | {min(train_s, 30):.1f} | {len(idle_gaps)} | {idle.longest_stall_ms:.0f} | "
          f"{np.percentile(idle_gaps, 99):.0f} | - | - | - | - |")
    if os.environ.get("DMOE_BENCH_VERBOSE"):
        print("render ms:", [round(d * 1000) for d in stats["render"]], "stalls > 50 ms at tick:",
              [(i, round(g)) for i, g in enumerate(gaps) if g > 50])
    viewer.close()
    # the machine-readable last line (key=value), as in the other bench scripts
    print(f"bench=finetune_stall quick={int(args.quick)} ok={int(ok)} train_s={train_s:.4g} "
          f"longest_stall_ms={meter.longest_stall_ms:.4g} p99_stall_ms={np.percentile(gaps, 99):.4g} "
          f"idle_longest_stall_ms={idle.longest_stall_ms:.4g} start_click_ms={stats['start'][0] * 1000:.4g} "
          f"poll_max_ms={max(stats['poll'], default=0) * 1000:.4g} "
          f"plot_update_max_ms={max(stats['draw'], default=0) * 1000:.4g}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
