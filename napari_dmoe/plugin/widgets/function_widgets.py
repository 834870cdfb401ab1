"""magicgui function widgets contributed through npe2: "Segment layer with dMoE" and "Segment a folder with dMoE".

Each is a ``FunctionGui`` on the plain functions of ``plugin/functions.py`` (the engine facade): the model list is the
shared live one (``controls.ModelList``), the attribute choices follow the model and the image's own values, the
work runs in a napari thread worker with a progress bar, and calling the widget returns that worker (scripts and
tests wait on it). ``segment_layer_from_menu`` is the Layers > Segment menu entry: it opens the layer widget on the
selected image (napari 0.9 takes no plugin items in the layer list's context menu).
"""
# no ``from __future__ import annotations``: magicgui and napari's command injection read these annotations as types
from pathlib import Path
from typing import Any

import napari

from napari_dmoe.plugin.functions import UNKNOWN, attribute_choices
from napari_dmoe.plugin.widgets.controls import DEVICES

LAYER_WIDGET = "Segment layer with dMoE"


def _model_choices(_: Any = None) -> list[tuple[str, str]]:
    from napari_dmoe.plugin.widgets.controls import ModelList

    return [(entry.label, str(entry.path)) for entry in ModelList.shared().entries()]


class Refused(str):
    """What a worker returns instead of a result when the engine refused (one line for the user)."""


def _guarded(gen: Any) -> Any:
    """``gen``, with a refusal (an image that does not fit, a bad file: a ``ValueError``) returned as ``Refused``."""
    from napari_dmoe.inference.fit import FitError

    try:
        return (yield from gen)
    except FitError as err:
        return Refused(err.hint("tick 'segment anyway' to segment it regardless"))
    except (ValueError, OSError) as err:
        return Refused(err)


def _run(gen: Any, desc: str, done: Any) -> Any:
    """Start ``gen`` (yielding ``Step``s) in a napari thread worker with a progress bar; ``done(result)`` in the GUI
    thread, or the refusal shown as one line."""
    from napari.qt.threading import create_worker
    from napari.utils import progress
    from napari.utils.notifications import show_error

    from napari_dmoe.plugin.widgets.jobs import advance

    worker = create_worker(_guarded, gen, _start_thread=False)
    pbar = progress(total=0, desc=desc)
    worker.yielded.connect(lambda step: advance(pbar, step))
    worker.returned.connect(lambda result: show_error(f"{desc}: {result}") if isinstance(result, Refused)
                            else done(result))
    worker.finished.connect(pbar.close)
    worker.start()
    return worker


def _follow_model(gui: Any) -> None:
    """The model list stays live and the attribute choices follow the model (and the image's own values)."""
    from napari_dmoe.plugin.widgets.controls import ModelList

    def on_model(*_: Any) -> None:
        current = gui.attribute.value
        gui.attribute.reset_choices()
        gui.attribute.value = current if current in gui.attribute.choices else UNKNOWN
        if hasattr(gui, "image"):
            on_image()

    def on_image(*_: Any) -> None:
        layer = gui.image.value
        if layer is None or not gui.model.value:
            return
        from napari_dmoe.inference.patient import image_attributes
        from napari_dmoe.io.checkpoint import read_spec
        from napari_dmoe.model.spec import attribute_text

        try:
            found = image_attributes(read_spec(gui.model.value), layer.metadata)
        except ValueError:
            return
        text = attribute_text({name: value for name, (value, _) in found.items()}) if found else UNKNOWN
        if text in gui.attribute.choices:
            gui.attribute.value = text

    # a callable: napari resets every choice when a layer is added, and the model's values must come back
    gui.attribute.choices = lambda _: attribute_choices(gui.model.value) if gui.model.value else [UNKNOWN]
    gui.model.changed.connect(on_model)
    if hasattr(gui, "image"):
        gui.image.changed.connect(on_image)
    shared = ModelList.shared()
    shared.changed.connect(gui.model.reset_choices)
    gui.native.destroyed.connect(lambda *_: _disconnect(shared.changed, gui.model.reset_choices))
    on_model()


def _disconnect(signal: Any, slot: Any) -> None:
    try:
        signal.disconnect(slot)
    except (TypeError, RuntimeError):  # already gone
        pass


def segment_layer_widget() -> Any:
    """The "Segment layer with dMoE" function widget: image layer, model, attribute, device -> mask and routing
    layers (named and placed as the Segment widget's)."""
    from magicgui import magicgui
    from napari.layers import Image
    from napari.viewer import Viewer

    @magicgui(call_button="Segment", model={"choices": _model_choices},
              attribute={"widget_type": "ComboBox", "choices": [UNKNOWN]}, device={"choices": list(DEVICES)},
              segment_anyway={"label": "segment anyway",
                              "tooltip": "segment an image that does not fit the model (recorded with the mask)"})
    def segment_layer_with_dmoe(image: Image, model: str, attribute: str = UNKNOWN, device: str = "auto",
                                segment_anyway: bool = False, viewer: Viewer = None) -> Any:
        from napari.utils.notifications import show_info

        from napari_dmoe.plugin.functions import add_results, iter_segment_layer

        if image is None or not model:
            raise ValueError("choose an image layer and a model")
        target = viewer

        def done(layers: list) -> None:
            if target is not None and image in target.layers:
                add_results(target, layers)
                show_info(f"Segmented '{image.name}': {layers[0][1]['name']}")

        gen = iter_segment_layer(image, model, attribute, device, segment_anyway)
        return _run(gen, f"dMoE: {image.name}", done)

    _follow_model(segment_layer_with_dmoe)
    return segment_layer_with_dmoe


def segment_folder_widget() -> Any:
    """The "Segment a folder with dMoE" function widget: a folder of images (or a CSV of images and attributes)
    -> one mask per image in the output folder, each with its provenance; a progress bar over the images."""
    from magicgui import magicgui

    @magicgui(call_button="Segment folder", folder={"mode": "d", "label": "images"},
              output={"mode": "d", "label": "save masks in"},
              csv={"mode": "r", "filter": "*.csv", "label": "CSV (optional)",
                   "tooltip": "a column 'image' (file name in the folder) and one column per attribute"},
              model={"choices": _model_choices}, attribute={"widget_type": "ComboBox", "choices": [UNKNOWN]},
              device={"choices": list(DEVICES)}, overwrite={"tooltip": "redo images whose masks exist"},
              segment_anyway={"label": "segment anyway"})
    def segment_folder_with_dmoe(folder: Path, model: str, output: Path, csv: Path = Path(""),
                                 attribute: str = UNKNOWN, device: str = "auto", overwrite: bool = False,
                                 segment_anyway: bool = False) -> Any:
        from napari.utils.notifications import show_info, show_warning

        from napari_dmoe.plugin.functions import iter_segment_folder

        def done(summary: Any) -> None:
            segment_folder_with_dmoe.summary = summary
            (show_warning if summary.failed else show_info)(f"{folder}: {summary.text()}")

        gen = iter_segment_folder(folder, model, output, str(csv) if str(csv) not in ("", ".") else None,
                                  attribute, device, overwrite, segment_anyway)
        return _run(gen, f"dMoE folder {Path(folder).name}", done)

    _follow_model(segment_folder_with_dmoe)
    segment_folder_with_dmoe.summary = None
    return segment_folder_with_dmoe


def segment_layer_from_menu(viewer: napari.viewer.Viewer) -> None:  # noqa: D401
    """Layers > Segment > "Segment with dMoE...": open "Segment layer with dMoE" on the selected image layer."""
    from napari.layers import Image

    active = viewer.layers.selection.active
    _, gui = viewer.window.add_plugin_dock_widget("napari-dmoe", LAYER_WIDGET)
    if isinstance(active, Image):
        gui.image.value = active
