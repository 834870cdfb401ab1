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


def shoot(sample: str, out: Path, show_routing: bool) -> Path:
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_dmoe.plugin.launch import build_viewer

    viewer = napari.Viewer(title=f"napari-dmoe: {sample}", show=True)
    viewer.window._qt_window.resize(1500, 900)  # napari has no public API for the window size
    viewer, widget, _ = build_viewer(viewer, sample=sample, inspector=True)
    app = QApplication.instance()
    before = len(viewer.layers)
    widget.segment()
    _wait(app, lambda: widget.worker is None and len(viewer.layers) > before)
    for layer in viewer.layers:
        if "ground truth" in layer.name:
            layer.visible = False
    if show_routing:  # the dominant expert per pixel over the image, the mask as outlines on top
        for layer in viewer.layers:
            if " dominant " in f" {layer.name} ":
                layer.visible = True
                layer.opacity = 0.6
            elif " mask " in f" {layer.name} ":
                layer.contour = 2
                viewer.layers.selection.active = layer
    if viewer.dims.ndisplay == 2 and viewer.dims.ndim == 3:
        viewer.dims.set_point(0, viewer.dims.range[0].stop / 2)
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
    viewer.screenshot(str(out), canvas_only=False, flash=False)
    viewer.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for sample, routing, name in [("fundus", False, "napari_fundus.png"), ("fundus", True, "napari_fundus_routing.png"),
                                  ("prostate", False, "napari_prostate.png")]:
        print("wrote", shoot(sample, args.out / name, routing))


if __name__ == "__main__":
    main()
