"""The Fine-tune widget's default run, timed from the Start click to the before/after table, with napari open.

What a clinician does at a new site: 10 corrected cases of the rare group (site c, race Black) on the fundus demo
model, the widget's defaults untouched (group-local, cross-validated steps, CPU). Optionally beside ``--busy N``
processes that spin a core each (another user's work), so the figure is the one a busy workstation gives.

    xvfb-run -a python bench/bench_finetune_widget.py --busy 1 --runs 3
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = Path(__file__).resolve().parents[1] / "napari_dmoe" / "assets" / "models" / "fundus-dmoe.safetensors"


def one_run(viewer, app, n: int, out: Path) -> tuple[float, bool, str]:
    """Seconds from Start to the filled before/after table, whether it finished, and the table's status line."""
    from napari_dmoe.plugin.widgets.finetune_widget import FinetuneWidget

    widget = FinetuneWidget(viewer)
    widget.models.set_path(str(MODEL))
    widget.output.setText(str(out))
    widget.devices.combo.setCurrentIndex(widget.devices.combo.findData("cpu"))
    for i in range(n):
        widget.viewer.layers.selection.active = widget.viewer.layers[f"case{i}"]
        widget.add_pair(labels=f"case{i} corrected")
    t0 = time.monotonic()
    widget.start()
    while widget.process is not None and time.monotonic() - t0 < 1200:
        app.processEvents()
        time.sleep(0.01)
    seconds = time.monotonic() - t0
    ok = widget.comparison is not None
    status = widget.status.text()
    widget.close()
    return seconds, ok, status


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--busy", type=int, default=1, help="processes spinning a core each beside napari")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    import napari
    import numpy as np

    from napari_dmoe.synthetic.fundus import make_fundus

    tmp = Path(tempfile.mkdtemp(prefix="dmoe-ft-widget-"))
    os.environ.setdefault("NAPARI_DMOE_CONFIG_DIR", str(tmp / "config"))
    viewer = napari.Viewer(show=True)
    app = napari.qt.get_qapp()
    for i in range(args.cases):  # indices no study split uses, as the fine-tune benchmark's draws do
        sample = make_fundus(2029, race="Black", index=5000 + i, site="c")
        viewer.add_image(sample.image, name=f"case{i}", metadata={"dmoe_attributes": {"race": "Black"}})
        # FairSeg mask convention (0, -1 rim, -2 cup) -> the model's classes (0, 1 rim, 2 cup)
        viewer.add_labels(-np.asarray(sample.mask, np.int32), name=f"case{i} corrected")
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        results = [one_run(viewer, app, args.cases, tmp / f"runs{r}") for r in range(args.runs)]
    finally:
        for p in busy:
            p.kill()
    viewer.close()
    times = sorted(s for s, _, _ in results)
    print(f"cases {args.cases}, busy processes {args.busy}, load after {os.getloadavg()[0]:.1f}; "
          f"runs (s): {', '.join(f'{s:.1f}' for s, _, _ in results)}; finished: {[ok for _, ok, _ in results]}")
    for _, _, status in results:
        print("  status:", " ".join(status.split())[:200])
    print(f"bench=finetune_widget cases={args.cases} busy={args.busy} runs={args.runs} "
          f"median_s={times[len(times) // 2]:.4g} min_s={times[0]:.4g} max_s={times[-1]:.4g} "
          f"ok={int(all(ok for _, ok, _ in results))}", flush=True)
    return 0 if all(ok for _, ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
