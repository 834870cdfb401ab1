"""The Segment dock widget: pick a model, an image and the patient attribute, press Segment.

GUI (controls.py) / jobs (jobs.py, no Qt) / layers (results.py, no Qt). Inference runs in a napari generator worker;
its ``Step`` yields drive the progress bars and ``worker.quit()`` cancels between two window batches. The image is
captured at launch, so results land on it whatever is selected meanwhile. A mismatch with the model's training data
(``fit_check.py``) is a red banner and the button reads "Segment anyway" (recorded with the result). Attribute values
come from the image or the user, labelled with their source; a new image never inherits the last one's. Re-running
with the same image, model and attribute replaces those result layers, never a mask the user edited ("(edited)").
"""
from __future__ import annotations

import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

from napari.layers import Image
from napari.qt.threading import create_worker
from napari.utils import progress
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtWidgets import QComboBox, QFormLayout, QHBoxLayout, QLabel, QPushButton, QVBoxLayout, QWidget
from superqt import QCollapsible

from napari_dmoe.model.registry import routing_positions
from napari_dmoe.model.spec import attribute_text
from napari_dmoe.plugin.widgets import settings
from napari_dmoe.plugin.widgets.controls import FROM_USER, AdvancedOptions, AttributeForm, DevicePicker, ModelPicker
from napari_dmoe.plugin.widgets.controls import OptionError
from napari_dmoe.plugin.widgets.scroll import scroll_body
from napari_dmoe.plugin.widgets.fit_check import FitCheck
from napari_dmoe.plugin.widgets.jobs import JobResult, ModelCache, Step, advance, run_sweep
from napari_dmoe.plugin.widgets.panels import ExpertView, FitBanner, RunProgress, SweepTable, run_summary
from napari_dmoe.plugin.widgets.placement import name_sliders, replace_layers, routing_layers
from napari_dmoe.plugin.widgets.remote import RemoteOption
from napari_dmoe.plugin.results import (
    RESULT_KEY,
    SourceInfo,
    is_result,
    layer_image,
    model_label,
    result_layers,
)
from napari_dmoe.plugin.widgets.save_mask import ask_which

if TYPE_CHECKING:
    import napari

RUN, RUN_ANYWAY, CANCEL, CANCELLING = "Segment", "Segment anyway", "Cancel", "Cancelling..."


class SegmentWidget(QWidget):
    """Dock widget: model, image, attribute(s), device, advanced options, Segment / Cancel, attribute sweep."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        # napari hands plugins a proxy that warns on private access; we only use public API but need identity
        # comparisons of layers, which the proxy's fresh wrappers would break
        self.viewer = getattr(napari_viewer, "__wrapped__", napari_viewer)
        self.spec: Any = None
        self.worker: Any = None
        self._pbar: progress | None = None
        self._cache = ModelCache()
        self._user_values: Any = weakref.WeakKeyDictionary()  # image layer -> attribute values the user chose
        self._shown_layer: Any = None
        self._build()
        self.viewer.layers.events.inserted.connect(self._refresh_images)
        self.viewer.layers.events.removed.connect(self._refresh_images)
        saved = settings.read("segment/model", "")
        if saved and Path(saved).is_file():
            self.models.refresh(select=saved)
        # the saved model first, so an image's attributes switch models only when that model does not take them
        self._on_model_changed(self.models.path())
        self._refresh_images()

    # -- layout --------------------------------------------------------------------------------------------
    def _build(self) -> None:
        self.models = ModelPicker()
        self.model_info = QLabel()
        self.model_info.setWordWrap(True)
        self.images = QComboBox()
        self.attributes = AttributeForm()
        self.devices = DevicePicker()
        self.advanced = AdvancedOptions()
        self.run_button = QPushButton(RUN)
        self.sweep_button = QPushButton("Sweep all values")
        self.sweep_button.setToolTip("Segment the image under every value of the attribute and compare the masks")
        self.sweep_attribute = QComboBox()
        self.status = QLabel()
        self.status.setWordWrap(True)
        self.save_button = QPushButton("Save mask...")
        self._save_tip = ("Save the mask of the image, model and attribute shown above (asks when there are "
                          "several): DICOM SEG for a DICOM series, NIfTI in the source geometry for NIfTI, PNG for "
                          "a 2D image")
        self.ask_mask = ask_which  # which mask to save when it is not clear (injectable: tests answer it)
        self.save_button.setEnabled(False)  # until there is a mask
        self.sweep_panel = SweepTable()
        self.sweep_table = self.sweep_panel.table
        self.fit_banner = FitBanner()
        self.fit_check = FitCheck(self.fit_banner, self)
        self.fit_check.changed.connect(lambda: self._set_running(self.worker is not None))
        self.progress_panel = RunProgress()
        self.experts = ExpertView(self.viewer)

        self.remote = RemoteOption(local_picker=self.models)  # "run on": this computer or a dmoe serve server
        form = QFormLayout()
        form.addRow("run on", self.remote)
        form.addRow("model", self.models)
        form.addRow(self.model_info)
        form.addRow("image", self.images)
        form.addRow(self.fit_banner)
        form.addRow(self.attributes)
        form.addRow("device", self.devices)
        sweep = QCollapsible("Attribute sweep")
        body = QWidget()
        sweep_layout = QVBoxLayout(body)
        row = QHBoxLayout()
        row.addWidget(QLabel("over"))
        row.addWidget(self.sweep_attribute, 1)
        row.addWidget(self.sweep_button)
        sweep_layout.addLayout(row)
        sweep_layout.addWidget(self.sweep_panel)
        sweep.addWidget(body)
        sweep.expand(animate=False)
        layout = scroll_body(self)
        layout.addLayout(form)
        layout.addWidget(self.advanced)
        layout.addWidget(self.run_button)
        layout.addWidget(self.progress_panel)
        layout.addWidget(self.status)
        layout.addWidget(self.experts)
        layout.addWidget(self.save_button)
        layout.addWidget(sweep)
        layout.addStretch(1)

        self.models.changed.connect(self._on_model_changed)
        # only what the user picks is remembered (not a model picked to match an image's attributes)
        self.models.chosen.connect(lambda path: settings.write("segment/model", path))
        self.remote.changed.connect(lambda: self._on_model_changed(self.models.path()))
        self.images.currentIndexChanged.connect(self._on_image_changed)
        self.attributes.changed.connect(self._on_attribute_changed)
        self.sweep_attribute.currentIndexChanged.connect(lambda _: self.sweep_panel.clear())
        self.devices.set_device(settings.read("segment/device", "auto"))
        self.devices.combo.currentIndexChanged.connect(lambda _: settings.write("segment/device",
                                                                                self.devices.device()))
        self.advanced.persist("segment/advanced")
        self.run_button.clicked.connect(self._on_run_clicked)
        self.sweep_button.clicked.connect(self.sweep)
        self.save_button.clicked.connect(lambda: self.save_mask())

    # -- model and image -----------------------------------------------------------------------------------
    def _on_model_changed(self, path: str) -> None:
        self.spec = self.remote.spec  # a server's model when running on a server
        if path and not self.remote.remote:
            from napari_dmoe.io.checkpoint import read_spec

            try:
                self.spec = read_spec(path)  # header only: fast, and bad files are reported right away
            except ValueError as err:
                show_error(f"Cannot use this model: {err}")
                self.status.setText(f"Model not usable: {err}")
        spec = self.spec
        self.attributes.set_spec(spec, self._found_attributes(self.selected_image()))
        self.advanced.set_positions(routing_positions(spec) if spec else [])
        self.sweep_panel.clear()
        self._check_fit()
        self.sweep_attribute.clear()
        if spec is not None:
            self.sweep_attribute.addItems([a.name for a in spec.attributes])
            classes = ", ".join(spec.class_names[1:])
            self.model_info.setText(f"{spec.arch}, {spec.routing} with {spec.n_experts} experts; classes: {classes}")
            self.status.setText("")
        else:
            self.model_info.setText("")
        self._set_running(False)

    def _image_layers(self) -> list[Image]:
        return [layer for layer in self.viewer.layers if isinstance(layer, Image) and not is_result(layer.metadata)]

    def _refresh_images(self, event: Any = None) -> None:
        current = self.images.currentText()
        names = [layer.name for layer in self._image_layers()]
        self.images.blockSignals(True)
        self.images.clear()
        self.images.addItems(names)
        inserted = getattr(event, "value", None) if event is not None and event.type == "inserted" else None
        if isinstance(inserted, Image) and inserted.name in names:
            current = inserted.name  # a newly opened image is what the user wants to segment next
        self.images.setCurrentIndex(max(self.images.findText(current), 0))
        self.images.blockSignals(False)
        self._on_image_changed()

    def _on_image_changed(self, *_: Any) -> None:
        layer = self.selected_image()
        meta = layer.metadata.get("dmoe_attributes") if layer is not None else None  # our samples name theirs
        if layer is not self._shown_layer and self.worker is None:
            self.status.setText("")  # the previous image's line (a model picked for this one is said below)
        self._match_model({str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {})
        if layer is not self._shown_layer:  # values, fit, sweep rows, status and legend belong to one image
            self._shown_layer = layer
            self.attributes.apply(self._found_attributes(layer))
            self.sweep_panel.clear()
            self._check_fit()
            self.experts.set_layers(routing_layers(self.viewer, layer.name) if layer is not None else {})
            if layer is not None:
                name_sliders(self.viewer, layer)
        self._update_save()
        self._set_running(self.worker is not None)

    def _found_attributes(self, layer: Any) -> dict[str, tuple[str, str]]:
        """name -> (value, source) for ``layer``: what the image says, then what the user chose for it."""
        if layer is None or self.spec is None:
            return {}
        from napari_dmoe.inference.patient import image_attributes

        found = image_attributes(self.spec, layer.metadata)
        found.update({k: (v, FROM_USER) for k, v in self._user_values.get(layer, {}).items()})
        return found

    def _on_attribute_changed(self) -> None:
        layer = self.selected_image()
        if layer is not None:
            chosen = {n: v for n, v in self.attributes.values().items() if self.attributes.source(n) == FROM_USER}
            self._user_values[layer] = chosen
        self.sweep_panel.clear()

    def _check_fit(self) -> None:
        """Show how the selected image differs from what the model was trained on (a banner; nothing if it fits;
        the model's feature check adds to it when done, ``fit_check.py``)."""
        self.fit_check.check(self.spec, self.models.path(), self.selected_image(),
                             f"the model '{model_label(self.model_ref())}'", local=not self.remote.remote)
        self._set_running(self.worker is not None)

    def _update_save(self, *_: Any) -> None:
        from napari_dmoe.plugin.widgets.save_mask import is_mask

        has_mask = any(is_mask(layer) for layer in self.viewer.layers)
        self.save_button.setEnabled(has_mask)
        self.save_button.setToolTip(self._save_tip if has_mask else "No mask yet: segment an image first")

    def _match_model(self, attrs: dict[str, str]) -> None:
        """If the image names attributes the chosen model lacks (e.g. a prostate sample with a fundus model),
        switch to a bundled model conditioned on exactly those attributes, and say so."""
        names = set(attrs)
        if not names or (self.spec is not None and names == {a.name for a in self.spec.attributes}):
            return
        entry = self.models.models.bundled_for(names)
        if entry is not None:
            self.models.refresh(select=str(entry.path))  # bundled: not added to the recent list, not remembered
            self.status.setText(f"Picked the demo model {entry.name} for this image ({', '.join(sorted(names))}).")

    def model_ref(self) -> str:
        """The model results are made with, as their provenance names it: the server's model, else the file."""
        return self.remote.model_ref or self.models.path()

    def selected_image(self) -> Image | None:
        name = self.images.currentText()
        return self.viewer.layers[name] if name in self.viewer.layers else None  # noqa: SIM401 (no .get)

    # -- run / cancel --------------------------------------------------------------------------------------
    def _on_run_clicked(self) -> None:
        if self.worker is None:
            self.segment()
        else:
            self.cancel()

    def segment(self) -> Any:
        """Start segmenting the selected image under the chosen attribute; returns the worker (or None)."""
        return self._launch([self.attributes.values()], sweep=False)

    def sweep(self) -> Any:
        """Segment under every value of the sweep attribute (others as chosen); returns the worker."""
        if self.spec is None:
            return self._launch([], sweep=True)
        name = self.sweep_attribute.currentText() or self.spec.attributes[0].name
        values = next(a.values for a in self.spec.attributes if a.name == name)
        base = self.attributes.values()
        return self._launch([{**base, name: v} for v in values], sweep=True)

    def cancel(self) -> None:
        if self.worker is not None:
            self.worker.quit()  # checked by the worker between two yields, i.e. between window batches
            self.run_button.setText(CANCELLING)
            self.run_button.setEnabled(False)

    def _launch(self, attributes: list[dict[str, str]], sweep: bool) -> Any:
        if self.worker is not None:
            show_info("A segmentation is already running; cancel it first.")
            return None
        layer = self.selected_image()
        problem = ("pick a model first (demo list or Browse...)" if self.spec is None
                   else "open or select an image layer first" if layer is None else None)
        if problem:
            show_error(f"Cannot segment: {problem}")
            return None
        try:
            options = self.advanced.options(self.spec.spatial_dims)
        except OptionError as err:
            show_error(str(err))
            return None
        from napari_dmoe.inference.request import EngineSettings, SegmentRequest

        data, spacing, rgb, modality = layer_image(layer)
        # force: the banner showed how the image differs from the training data, and the user pressed
        # "Segment anyway"; the provenance of the result records it
        request = SegmentRequest(data, attributes[0] if attributes else None, spacing, rgb=rgb, modality=modality,
                                 force=bool(self.fit_banner.findings),
                                 settings=EngineSettings(device=self.devices.device(), **options), source=layer.name)
        launch = {"layer": layer, "position": self.advanced.position.currentText(), "sweep": sweep,
                  "maps": options["routing"] != "none",
                  "source": SourceInfo(layer.name, tuple(layer.scale), tuple(layer.translate), dict(layer.metadata),
                                       bool(layer.rgb))}
        job = self.remote.job(request, attributes) or (run_sweep, self.models.path(), request, self._cache,
                                                       attributes)
        worker = create_worker(*job, _start_thread=False)
        worker.yielded.connect(self._on_step)
        worker.returned.connect(lambda result, launch=launch: self._on_result(result, launch))
        worker.aborted.connect(lambda: self.status.setText("Cancelled."))
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self._pbar = progress(total=0, desc=f"dMoE: {layer.name}")
        self.progress_panel.start()
        self.status.setText(f"Segmenting {layer.name}...")
        self._set_running(True)
        worker.start()
        return worker

    def _set_running(self, running: bool) -> None:
        ready = self.spec is not None and self.images.count() > 0
        self.run_button.setText(CANCEL if running else RUN_ANYWAY if self.fit_banner.findings else RUN)
        self.run_button.setEnabled(running or ready)
        self.sweep_button.setEnabled(not running and ready and self.spec.routing == "dmoe")

    def _on_step(self, step: Step) -> None:
        self.progress_panel.step(step)
        advance(self._pbar, step)  # local read: progress events can run queued signals, even 'finished'

    def _on_finished(self) -> None:
        if self._pbar is not None:
            self._pbar.close()
        self._pbar = None
        self.worker = None
        self.progress_panel.finish()
        self._set_running(False)

    # -- results -------------------------------------------------------------------------------------------
    def _on_result(self, result: JobResult, launch: dict[str, Any]) -> None:
        source: SourceInfo = launch["source"]
        if result.error:
            show_error(f"Segmentation of '{source.name}' failed: {result.error}")
            self.status.setText(f"Failed: {result.error}")
            if result.findings and launch["layer"] is self.selected_image():  # the engine's fit check refused it
                self.fit_check.show(result.findings, f"the model '{model_label(self.model_ref())}'")
            return
        if not any(layer is launch["layer"] for layer in self.viewer.layers):
            show_warning(f"The image '{source.name}' was removed while it was being segmented; "
                         "the results were discarded.")
            self.status.setText("Image removed during the run: results discarded.")
            return
        warnings = [f.message for f in self.fit_banner.findings] if launch["layer"] is self.selected_image() else []
        kept: list[tuple[str, str]] = []
        chosen = attribute_text(self.attributes.values())
        for tag, seg in result.segmentations.items():
            layers = result_layers(seg, result.model.spec, str(result.model.path), source, result.requests[tag],
                                   position=launch["position"], maps=launch["maps"] and not launch["sweep"],
                                   record=result.provenance.get(tag))
            if launch["sweep"] and tag != chosen:  # one mask of a sweep shows; the others wait, hidden
                layers[0][1]["visible"] = False
            kept += replace_layers(self.viewer, layers)
            warnings += [w for w in layers[0][1]["metadata"][RESULT_KEY]["warnings"] if w not in warnings]
        self.experts.show_run(layers)
        text = run_summary(result, warnings, self.progress_panel.elapsed(), self.progress_panel.loading)
        if kept:
            text += "; kept your edited " + ", ".join(f"'{old}' as '{new}'" for old, new in kept)
            show_info("Your edits were kept: " + "; ".join(f"'{old}' is now '{new}'" for old, new in kept)
                      + "; the new result has the usual name.")
        self.status.setText(text)
        for w in warnings:
            show_warning(w)
        if launch["sweep"]:
            masks = {tag: seg.labels for tag, seg in result.segmentations.items()}  # their agreement, in the table
            self.sweep_panel.show_masks(masks, result.model.spec.n_classes, f"Agreement of the masks of "
                                        f"'{source.name}' over {self.sweep_attribute.currentText()}")

    def save_mask(self, path: str | Path | None = None) -> Path | None:
        """Save the mask of the image, model and attribute this widget shows (after a sweep: the attribute chosen
        above, not the last value swept; ``ask_mask`` when there are several) to ``path``, asked with a dialog when
        None, in the source's own format by default; returns the path written, or None when cancelled or refused."""
        from napari_dmoe.plugin.widgets.save_mask import save_dialog

        layer = self.selected_image()
        shown = (layer.name if layer is not None else None, attribute_text(self.attributes.values()), self.model_ref())
        written = save_dialog(self, self.viewer, path, shown, self.ask_mask)
        if written is not None:
            self.status.setText(f"Saved to {written}")
        return written
