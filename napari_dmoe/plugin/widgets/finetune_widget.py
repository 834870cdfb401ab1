"""The Fine-tune dock widget: teach a model the user's corrected masks without freezing napari.

Three layers, as in napari-nninteractive: this file is the GUI (layout, the pairs taken from layers, signal
wiring); ``finetune_controls.py`` / ``finetune_monitor.py`` hold the sub-widgets; ``finetune_session.py`` runs the
fine-tune (export, ``dmoe train`` in a subprocess polled by a timer, comparison, cancel) and reports through
signals. The engine side is Qt-free: ``napari_dmoe.finetune.prepare`` (export, config) and ``napari_dmoe.finetune.process``.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from napari.layers import Image, Labels
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtWidgets import (
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QMessageBox,
    QPlainTextEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from napari_dmoe.plugin.widgets.controls import DevicePicker, ModelPicker
from napari_dmoe.plugin.widgets.scroll import scroll_body
from napari_dmoe.plugin.widgets.finetune_controls import TRAINABLE, CompareTable, PairTable, SettingsForm
from napari_dmoe.plugin.widgets.finetune_monitor import CurvePlot
from napari_dmoe.plugin.widgets.finetune_session import FinetuneSession, RunRequest
from napari_dmoe.plugin.results import RESULT_KEY, is_result
from napari_dmoe.finetune.prepare import FinetuneError

if TYPE_CHECKING:
    import napari

START, CANCEL, CANCELLING = "Start fine-tune", "Cancel", "Cancelling..."


def _ask(parent: QWidget, question: str) -> bool:
    answer = QMessageBox.question(parent, "Fine-tune", question, QMessageBox.Yes | QMessageBox.No, QMessageBox.No)
    return answer == QMessageBox.Yes


class FinetuneWidget(QWidget):
    """Dock widget: base model, pairs from layers (and a CSV), settings, Start/Cancel, curves, before/after."""

    def __init__(self, napari_viewer: "napari.viewer.Viewer", confirm: Callable[[QWidget, str], bool] = _ask,
                 segment_widget: Any = None) -> None:
        super().__init__()
        self.viewer = getattr(napari_viewer, "__wrapped__", napari_viewer)  # identity checks need the real viewer
        self.confirm = confirm  # injectable: tests answer the Cancel question without a modal dialog
        self.segment_widget = segment_widget
        self.spec: Any = None
        self.session = FinetuneSession(self)  # the run lifecycle; reports through signals wired in _build
        self.session.approve = self._approve_model
        self._build()
        from qtpy.QtWidgets import QApplication

        QApplication.instance().aboutToQuit.connect(self.stop_now)  # napari quits: never leave an orphan run
        self.viewer.layers.events.inserted.connect(self._refresh_layers)
        self.viewer.layers.events.removed.connect(self._refresh_layers)
        self._refresh_layers()
        self._on_model_changed(self.models.path())
        from napari_dmoe.plugin.widgets import settings as stored

        s = self.settings  # kept between napari sessions (QSettings), restored over the device defaults
        stored.persist("finetune/settings", {"steps": s.steps, "lr": s.lr, "batch": s.batch, "train": s.trainable,
                                             "amp": s.amp, "keep_base": s.keep_base,
                                             "validation_share": s.val_fraction, "runs": self.output})

    # -- layout --------------------------------------------------------------------------------------------
    def _build(self) -> None:
        self.models = ModelPicker()
        self.devices = DevicePicker()
        self.pairs = PairTable()
        self.add_button = QPushButton("Add pair")
        self.add_result_button = QPushButton("Add current result")
        self.add_result_button.setToolTip("Add the selected (corrected) mask layer with its image and attribute")
        self.remove_button = QPushButton("Remove")
        self.extra_csv = QLineEdit()
        self.extra_csv.setPlaceholderText("optional: CSV with image, mask, attribute columns")
        self.output = QLineEdit(str(Path.home() / "napari-dmoe" / "finetune"))
        self.settings = SettingsForm()
        self.run_button = QPushButton(START)
        self.status = QLabel()
        self.status.setWordWrap(True)
        self.errors = QPlainTextEdit()
        self.errors.setReadOnly(True)
        self.errors.setMaximumHeight(120)
        self.errors.hide()
        self.plot = CurvePlot()
        self.compare = CompareTable()
        self.segment_button = QPushButton("Segment current image with the new model")
        self.segment_button.setEnabled(False)

        form = QFormLayout()
        form.addRow("base model", self.models)
        form.addRow("device", self.devices)
        buttons = QHBoxLayout()
        for b in (self.add_button, self.add_result_button, self.remove_button):
            buttons.addWidget(b)
        browse = QPushButton("Browse...")
        csv_row = QHBoxLayout()
        csv_row.addWidget(self.extra_csv, 1)
        csv_row.addWidget(browse)
        layout = scroll_body(self)  # about 1000 px of content: it scrolls on a laptop screen
        layout.addLayout(form)
        layout.addWidget(QLabel("training pairs (image, corrected labels, attribute)"))
        layout.addWidget(self.pairs)
        layout.addLayout(buttons)
        layout.addLayout(csv_row)
        layout.addWidget(self.settings)
        out_form = QFormLayout()
        out_form.addRow("save runs in", self.output)
        layout.addLayout(out_form)
        layout.addWidget(self.run_button)
        layout.addWidget(self.status)
        layout.addWidget(self.errors)
        layout.addWidget(self.plot)
        layout.addWidget(self.compare)
        layout.addWidget(self.segment_button)

        self.models.changed.connect(self._on_model_changed)
        self.devices.combo.currentIndexChanged.connect(lambda _: self.apply_device_defaults())
        self.add_button.clicked.connect(lambda: self.add_pair())
        self.add_result_button.clicked.connect(lambda: self.add_current_result())
        self.remove_button.clicked.connect(self.pairs.remove_selected)
        self.remove_button.clicked.connect(lambda: self._follow_mode())
        self.settings.trainable.currentIndexChanged.connect(lambda _: self._follow_mode())
        browse.clicked.connect(self._browse_csv)
        self.run_button.clicked.connect(self._on_run_clicked)
        self.segment_button.clicked.connect(lambda: self.segment_with_new_model())

        self.session.started.connect(self._on_started)
        self.session.curves.connect(self._on_curves)
        self.session.status.connect(self.status.setText)
        self.session.cancelling.connect(self._on_cancelling)
        self.session.failed.connect(self._on_failed)
        self.session.compared.connect(self._on_compared)
        self.session.finished.connect(self._on_finished)

    def _browse_csv(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Training pairs CSV", "", "CSV (*.csv)")
        if path:
            self.extra_csv.setText(path)

    # -- model, layers, pairs ------------------------------------------------------------------------------
    def _on_model_changed(self, path: str) -> None:
        same = path == getattr(self, "_base_path", None)  # the list refreshed after a run: keep the settings
        self._base_path = path
        self.spec = None
        if path:
            from napari_dmoe.io.checkpoint import read_spec

            try:
                self.spec = read_spec(path)
            except ValueError as err:
                show_error(f"Cannot fine-tune this model: {err}")
                self.status.setText(f"Base model not usable: {err}")
        self.pairs.set_attributes(self.spec.attributes if self.spec else [])
        self.settings.set_spec(self.spec)
        if not same:
            self.apply_device_defaults()

    def apply_device_defaults(self) -> None:
        """Steps, batch and AMP from the free memory of the chosen device (``finetune.default_settings``)."""
        from napari_dmoe.finetune.prepare import default_settings, free_memory

        device = self.devices.device() or "cpu"
        if device == "auto":
            device = "cuda" if self.devices.problems.get("cuda") is None else "cpu"
        dims = self.spec.spatial_dims if self.spec else 2
        defaults = default_settings(device, free_memory(device), dims)
        self._defaults = defaults  # what the form shows; an untouched lr then follows the resolved mode (_request)
        self.settings.apply(defaults)
        self.settings.set_spec(self.spec)
        self._follow_mode()

    def _follow_mode(self) -> None:
        """Untouched steps and learning rate show the defaults of the mode that will train ("automatic" resolves
        from the pairs' groups; group-local has its own recipe), so the form shows what the run uses."""
        from napari_dmoe.finetune.prepare import default_settings, default_trainable

        shown = getattr(self, "_defaults", None)
        if shown is None or self.spec is None:
            return
        chosen = TRAINABLE[self.settings.trainable.currentText()]
        mode = default_trainable(self.spec, [row[2] for row in self.pairs.rows()]) if chosen == "auto" else chosen
        self.settings.follow(default_settings(shown.device, None, self.spec.spatial_dims, mode))
        self.settings.show_validation_share(mode != "group_local")  # group-local cross-validates on every pair

    def _refresh_layers(self, *_: Any) -> None:
        images = [l.name for l in self.viewer.layers if isinstance(l, Image) and not is_result(l.metadata)]
        labels = [l.name for l in self.viewer.layers if isinstance(l, Labels)]
        self.pairs.set_layer_names(images, labels)

    def add_pair(self, image: str | None = None, labels: str | None = None,
                 attributes: dict[str, str] | None = None, validation: bool = False) -> int:
        """Add a table row; defaults: the selected image and the newest labels layer, attributes stored with
        the image (``metadata["dmoe_attributes"]``)."""
        if image is None:
            active = self.viewer.layers.selection.active
            image = active.name if isinstance(active, Image) else (self.pairs.image_names or [None])[0]
        if labels is None and self.pairs.labels_names:
            labels = self.pairs.labels_names[-1]
        if attributes is None and image in self.viewer.layers:
            stored = self.viewer.layers[image].metadata.get("dmoe_attributes")
            attributes = {str(k): str(v) for k, v in stored.items()} if isinstance(stored, dict) else None
        row = self.pairs.add_row(image, labels, attributes, validation)
        self._follow_mode()
        return row

    def add_current_result(self) -> int | None:
        """Correct-and-learn: add the selected mask layer (a Segment result, edited by the user) with the
        image it was made from and the attribute it was segmented with."""
        layer = self.viewer.layers.selection.active
        meta = layer.metadata.get(RESULT_KEY) if isinstance(layer, Labels) else None
        if not isinstance(meta, dict) or meta.get("kind") != "mask":
            show_error("Select a mask layer made by the Segment widget (after correcting it) and try again.")
            return None
        source = meta.get("source_layer")
        if source not in self.viewer.layers:
            show_error(f"The image '{source}' this mask was made from is no longer open; open it again first.")
            return None
        request = {str(k): str(v) for k, v in (meta.get("attribute_request") or {}).items()}
        known = {k: v for k, v in request.items() if self.spec is None or any(
            a.name == k and v in a.values for a in self.spec.attributes)}
        if len(known) < len(request) or (self.spec is not None and len(known) < len(self.spec.attributes)):
            show_warning("The mask was made without a known attribute value: choose it in the table.")
        return self.pairs.add_row(source, layer.name, known)

    # -- run (the session does the work; these read the form and show what it reports) ---------------------
    # the run's state lives in the session; these read-only views keep the widget's public surface
    @property
    def process(self) -> Any:
        """The running TrainingProcess (training, then comparison), or None."""
        return self.session.process

    @property
    def phase(self) -> str | None:
        """The running phase: train, compare, or None when idle."""
        return self.session.phase

    @property
    def run_dir(self) -> Path | None:
        return self.session.run_dir

    @property
    def new_model(self) -> Path | None:
        """The saved fine-tuned model, once the comparison is done."""
        return self.session.new_model

    @property
    def last_checkpoint(self) -> Path | None:
        return self.session.last_checkpoint

    @property
    def comparison(self) -> dict[str, Any] | None:
        return self.session.comparison

    @property
    def timer(self) -> Any:
        """The poll timer (``bench/bench_finetune_stall.py`` times its slot)."""
        return self.session.timer

    def poll(self) -> None:
        """Read new events and handle the end of a process (the poll timer's slot)."""
        self.session.poll()

    def _on_run_clicked(self) -> None:
        if self.session.busy:
            self.cancel()
        else:
            self.start()

    def start(self) -> Any:
        """Export the pairs, write the config, start ``dmoe train``; returns the TrainingProcess (or None)."""
        if self.session.busy:
            show_info("A fine-tune is already running; cancel it first.")
            return None
        try:
            return self.session.start(self._request())
        except (ValueError, OSError) as err:  # FinetuneError, ImageWriteError, disk full...
            show_error(f"Cannot start the fine-tune: {err}")
            self.status.setText(f"Not started: {err}")
            return None

    def _request(self) -> RunRequest:
        """The run as the form describes it; FinetuneError names what is missing or wrong."""
        from napari_dmoe.finetune.prepare import default_settings, pairs_from_layers

        if self.spec is None:
            raise FinetuneError("pick a base model first (demo list, recent or Browse...)")
        extra = self.extra_csv.text().strip()
        self._follow_mode()  # the form shows what will run (a row's group may have changed since)
        pairs, is_val = pairs_from_layers(self.viewer.layers, self.pairs.rows(), self.settings.val_fraction.value(),
                                          bool(extra))
        settings = self.settings.settings(self.devices.device() or "cpu", self.spec.spatial_dims)
        settings.trainable = self._mode(settings.trainable, [p.attributes for p in pairs])
        # steps and lr as the form shows them; group-local's local experts and cross-validation from its recipe
        mode = default_settings(settings.device, None, self.spec.spatial_dims, settings.trainable)
        settings.local_experts, settings.folds = mode.local_experts, mode.folds
        return RunRequest(self.models.path(), self.spec, pairs, is_val, settings, Path(self.output.text()), extra)

    def _mode(self, chosen: str, attributes: list[dict[str, str]]) -> str:
        """What to train: "auto" resolves to group-local when the pairs cover some groups only; a full or
        routers+experts run with uncorrected groups needs the user's yes (FinetuneError when declined)."""
        from napari_dmoe.finetune.prepare import default_trainable, uncorrected_groups

        mode = default_trainable(self.spec, attributes) if chosen == "auto" else chosen
        others = uncorrected_groups(self.spec, attributes)
        if mode in ("all", "routers_experts") and others and not self.confirm(self, (
                f"Training {'all weights' if mode == 'all' else 'the routers and the shared experts'} changes "
                f"weights every group shares: the model may get worse for the groups you did not correct "
                f"({', '.join(others)}). A group-local fine-tune leaves them exactly as they are. Train anyway?")):
            raise FinetuneError("not started: choose group-local, or add corrected cases of every group")
        return mode

    def _approve_model(self, comparison: dict[str, Any]) -> bool:
        """Before the new model joins the model lists: ask when a group got worse or its masks changed."""
        flagged = [r for r in comparison.get("groups") or [] if r.get("flag")]
        if not flagged:
            return True
        lines = [f"{r['group']}: Dice {r['before']:.3f} -> {r['after']:.3f} ({r['source']})" if r["flag"] == "worse"
                 else f"{r['group']}: masks changed (agreement {r['agreement']:.3f}, no labels)" for r in flagged]
        return self.confirm(self, "The new model is worse for, or changes the masks of, groups:\n" + "\n".join(lines)
                            + "\nAdd it to the model lists anyway? (No keeps it in the run folder only.)")

    def cancel(self) -> bool:
        """Ask, then stop the training process (terminate, then kill after a timeout). Returns whether it stops."""
        if not self.session.busy:
            return False
        if not self.confirm(self, "Stop the fine-tune? The last saved checkpoint is kept."):
            return False
        return self.session.cancel()

    def _set_running(self, running: bool) -> None:
        self.run_button.setText(CANCEL if running else START)
        self.run_button.setEnabled(True)
        for w in (self.models, self.devices, self.settings, self.add_button, self.add_result_button):
            w.setEnabled(not running)

    # -- what the session reports --------------------------------------------------------------------------
    def _on_started(self, text: str) -> None:
        self.errors.hide()
        self.compare.setRowCount(0)
        self.segment_button.setEnabled(False)
        self.plot.clear()
        self.status.setText(text)
        self._set_running(True)

    def _on_curves(self, state: Any, changed: bool, force: bool) -> None:
        if changed or force or self.plot.pending:  # pending: data that arrived while the plot was throttled
            self.plot.update_curves(state.losses, state.val, force=force)

    def _on_cancelling(self) -> None:
        self.run_button.setText(CANCELLING)
        self.run_button.setEnabled(False)

    def _on_failed(self, title: str, reason: str, tail: str) -> None:
        show_error(f"{title}: {reason}")
        self.errors.setPlainText(f"{title}: {reason}\n\n--- last lines of the process output ---\n{tail}")
        self.errors.show()

    def _on_compared(self, comparison: dict[str, Any]) -> None:
        self.compare.show_groups(comparison.get("groups") or [])
        if not comparison.get("registered", True):
            return  # the user declined a model that got worse for a group: it stays out of the lists
        # the new model is already in every model picker (the shared list); this one keeps the base model
        self.segment_button.setEnabled(True)

    def _on_finished(self, text: str) -> None:
        self.status.setText(text)
        self._set_running(False)

    # -- after -----------------------------------------------------------------------------------------------
    def segment_with_new_model(self) -> Any:
        """Open (or reuse) the Segment widget, select the new model and segment the current image."""
        if self.new_model is None:
            show_error("No fine-tuned model yet: run a fine-tune first.")
            return None
        widget = self.segment_widget
        if widget is None:
            _, widget = self.viewer.window.add_plugin_dock_widget("napari-dmoe", "Segment (dMoE)")
            self.segment_widget = widget
        widget.models.set_path(str(self.new_model))
        return widget.segment()

    def stop_now(self) -> None:
        """Stop a running process without asking (the app or the widget is closing)."""
        self.session.stop_now()

    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt name)
        self.stop_now()
        super().closeEvent(event)

