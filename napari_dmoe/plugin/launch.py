"""``python -m napari_dmoe.plugin.launch``: napari with the Segment widget docked and a sample image loaded.

The sample is this plugin's synthetic fundus (no download). If it cannot be made, scikit-image's real retina
photograph (converted to grey) is loaded instead and the fallback is reported.
"""
from __future__ import annotations

import argparse
from typing import Any

SEGMENT_WIDGET = "Segment (dMoE)"
INSPECTOR_WIDGET = "Routing inspector"


def load_sample(viewer: Any, key: str = "fundus") -> str:
    """Open a sample in ``viewer``; return a one-line note saying which."""
    try:
        viewer.open_sample("napari-dmoe", key)
        return f"loaded the napari-dmoe sample {key!r}"
    except Exception as err:  # the sample module is another part of the plugin; the demo must still open
        from skimage import data
        from skimage.color import rgb2gray

        viewer.add_image(rgb2gray(data.retina()).astype("float32"), name="retina (grey, scikit-image)")
        return f"sample {key!r} unavailable ({type(err).__name__}: {err}); loaded scikit-image retina in grey"


def build_viewer(viewer: Any = None, sample: str = "fundus", inspector: bool = True) -> tuple[Any, Any, str]:
    """Viewer (new unless given) with the sample, the Segment widget and the routing inspector docked."""
    import napari

    viewer = viewer if viewer is not None else napari.Viewer(title="napari-dmoe")
    note = load_sample(viewer, sample)
    _, widget = viewer.window.add_plugin_dock_widget("napari-dmoe", SEGMENT_WIDGET)
    if inspector:
        viewer.window.add_plugin_dock_widget("napari-dmoe", INSPECTOR_WIDGET, tabify=True)
    return viewer, widget, note


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m napari_dmoe.plugin.launch", description=__doc__.splitlines()[0])
    parser.add_argument("--sample", default="fundus", help="sample key: fundus, prostate, skin or retina")
    args = parser.parse_args(argv)
    import napari

    _, _, note = build_viewer(sample=args.sample)
    print(f"napari-dmoe: {note}")
    napari.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
