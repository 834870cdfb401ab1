"""Make the README screenshots: napari with the dMoE widgets, a sample, its segmentation and routing maps.

Run under a (virtual) display, e.g. ``xvfb-run -a -s "-screen 0 1600x1000x24" python docs/make_screenshots.py``.
Uses the bundled demo models when installed, else says so on the picture's window title.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

HERE = Path(__file__).parent / "images"


def _wait(app, predicate, timeout: float = 300.0) -> None:
    start = time.monotonic()
    while not predicate():
        app.processEvents()
        time.sleep(0.02)
        if time.monotonic() - start > timeout:
            raise TimeoutError("segmentation did not finish in time")


def _busiest_expert(viewer) -> int:
    """The expert that dominates most of the mask (the one worth showing alone)."""
    import numpy as np

    mask = next(l for l in viewer.layers if l.metadata.get("dmoe", {}).get("kind") == "mask")
    dominant = next(l for l in viewer.layers if l.metadata.get("dmoe", {}).get("kind") == "dominant")
    counts = np.bincount(np.asarray(dominant.data)[np.asarray(mask.data) > 0].ravel())
    return int(np.argmax(counts[1:])) if counts.size > 1 else 0


def shoot(sample: str, out: Path, routing: str | None, mismatch: str | None = None) -> Path:
    """``routing``: None (the mask), "dominant" (dominant expert + legend) or "expert" (one expert's heatmap with
    its colorbar). ``mismatch``: open this sample after ``sample`` and show the fit banner instead of a run."""
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_dmoe.plugin.launch import build_viewer

    viewer = napari.Viewer(title=f"napari-dmoe: {mismatch or sample}", show=True)
    viewer.window._qt_window.resize(1500, 900)  # napari has no public API for the window size
    viewer, widget, _ = build_viewer(viewer, sample=sample, inspector=True)
    app = QApplication.instance()
    if mismatch:
        viewer.open_sample("napari-dmoe", mismatch)
        viewer.reset_view()  # the new image is far larger than the first sample
        _wait(app, lambda: widget.fit_check.worker is None)  # the model's own feature check joins the banner
    else:
        before = len(viewer.layers)
        widget.segment()
        _wait(app, lambda: widget.worker is None and len(viewer.layers) > before)
    if routing == "dominant":  # the dominant expert per pixel over the image, the mask as outlines on top
        widget.experts.show_dominant()
    elif routing == "expert":
        widget.experts.show_expert(_busiest_expert(viewer))
    if routing:
        for layer in viewer.layers:
            if layer.metadata.get("dmoe", {}).get("kind") == "mask":
                layer.contour = 2
    labels = list(viewer.dims.axis_labels)
    if viewer.dims.ndisplay == 2 and "z" in labels:
        z = labels.index("z")
        viewer.dims.set_point(z, (viewer.dims.range[z].start + viewer.dims.range[z].stop) / 2)
    # the Segment widget in front of the inspector (tabified); napari has no public API for tab order
    from qtpy.QtWidgets import QTabBar

    for bar in viewer.window._qt_window.findChildren(QTabBar):
        for i in range(bar.count()):
            if bar.tabText(i).startswith("Segment"):
                bar.setCurrentIndex(i)
    from napari._qt.dialogs.qt_notification import NapariQtNotification  # toasts (e.g. a Qt5 deprecation note)

    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        toast.close()
    app.processEvents()
    widget.parent().raise_()  # the Segment tab in front (a sample opened later can raise the inspector)
    app.processEvents()
    viewer.screenshot(str(out), canvas_only=False, flash=False)
    viewer.close()
    return out


def shoot_dock(sample: str, out: Path, widget_name: str) -> Path:
    """``widget_name`` docked beside ``sample``: "Segment layer with dMoE" (the magicgui function widget, run once)
    or "Fine-tune (dMoE)" (its form in a scrolling dock)."""
    import napari
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(title=f"napari-dmoe: {widget_name}", show=True)
    viewer.window._qt_window.resize(1500, 900)  # napari has no public API for the window size
    viewer.open_sample("napari-dmoe", sample)
    _, widget = viewer.window.add_plugin_dock_widget("napari-dmoe", widget_name)
    app = QApplication.instance()
    if widget_name == "Segment layer with dMoE":
        widget.model.value = next(v for v in widget.model.choices if Path(v).stem == f"{sample}-dmoe")
        widget.image.value = viewer.layers[0]  # the sample, not its ground truth
        worker = widget()
        _wait(app, lambda: worker.is_running is False and any("dmoe" in layer.metadata for layer in viewer.layers))
    for _ in range(20):
        app.processEvents()
        time.sleep(0.02)
    from napari._qt.dialogs.qt_notification import NapariQtNotification  # toasts over the canvas

    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        toast.close()
    app.processEvents()
    viewer.screenshot(str(out), canvas_only=False, flash=False)
    viewer.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--only", nargs="*", help="file names of the shots to make (default: all)")
    args = parser.parse_args()
    import os
    import tempfile

    # fresh widget settings (QSettings, recent models), so the pictures never depend on this user's choices
    os.environ.setdefault("NAPARI_DMOE_CONFIG_DIR", tempfile.mkdtemp(prefix="dmoe-screenshots-"))
    args.out.mkdir(parents=True, exist_ok=True)
    shots = [("fundus", None, None, "napari_fundus.png"), ("fundus", "dominant", None, "napari_fundus_routing.png"),
             ("prostate", None, None, "napari_prostate.png"),
             ("prostate", "expert", None, "napari_prostate_routing.png"),
             ("skin", None, "retina", "napari_mismatch.png")]
    for sample, routing, mismatch, name in shots:
        if args.only and name not in args.only:
            continue
        print("wrote", shoot(sample, args.out / name, routing, mismatch))
    for sample, widget, name in (("fundus", "Segment layer with dMoE", "napari_function_widget.png"),
                                 ("fundus", "Fine-tune (dMoE)", "napari_finetune.png")):
        if not args.only or name in args.only:
            print("wrote", shoot_dock(sample, args.out / name, widget))


if __name__ == "__main__":
    main()
