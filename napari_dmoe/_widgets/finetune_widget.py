"""The Fine-tune dock widget: teach a model the user's corrected masks without freezing napari.

GUI wiring only. The layers are exported and the config written by ``napari_dmoe.finetune``; ``dmoe train`` runs
in a subprocess (``napari_dmoe.finetune_run.TrainingProcess``) polled by a QTimer every 200 ms, so the GUI thread
only reads a small events file and redraws a throttled plot. Afterwards a second subprocess compares the base and
the new model on the held-back pairs and saves the new model with its provenance; it is then registered in the
recent-model list the Segment widget reads.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from napari.layers import Image, Labels
from napari.utils import progress
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QTimer
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

from napari_dmoe._widgets.controls import DevicePicker, ModelPicker
from napari_dmoe._widgets.finetune_controls import CompareTable, CurvePlot, PairTable, SettingsForm
from napari_dmoe._widgets.results import RESULT_KEY, is_result
from napari_dmoe.finetune import FinetuneError

if TYPE_CHECKING:
    import napari

START, CANCEL, CANCELLING = "Start fine-tune", "Cancel", "Cancelling..."
POLL_MS = 200
KILL_AFTER_S = 5.0


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
        self.process: Any = None  # the running TrainingProcess (training, then comparison)
        self.phase: str | None = None  # "train" | "compare" | None
        self.run_dir: Path | None = None
        self.new_model: Path | None = None
        self.last_checkpoint: Path | None = None
        self.comparison: dict[str, Any] | None = None
        self._kill_at: float | None = None
        self._cancelled = False
        self._pbar: progress | None = None
        self._launch: dict[str, Any] = {}
        self.timer = QTimer(self)
        self.timer.setInterval(POLL_MS)
        self.timer.timeout.connect(self.poll)
        self._build()
        from qtpy.QtWidgets import QApplication

        QApplication.instance().aboutToQuit.connect(self.stop_now)  # napari quits: never leave an orphan run
        self.viewer.layers.events.inserted.connect(self._refresh_layers)
        self.viewer.layers.events.removed.connect(self._refresh_layers)
        self._refresh_layers()
        self._on_model_changed(self.models.path())

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
        layout = QVBoxLayout(self)
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
        browse.clicked.connect(self._browse_csv)
        self.run_button.clicked.connect(self._on_run_clicked)
        self.segment_button.clicked.connect(lambda: self.segment_with_new_model())

    def _browse_csv(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Training pairs CSV", "", "CSV (*.csv)")
        if path:
            self.extra_csv.setText(path)

    # -- model, layers, pairs ------------------------------------------------------------------------------
    def _on_model_changed(self, path: str) -> None:
        self.spec = None
        if path:
            from napari_dmoe.checkpoint import read_spec

            try:
                self.spec = read_spec(path)
            except ValueError as err:
                show_error(f"Cannot fine-tune this model: {err}")
                self.status.setText(f"Base model not usable: {err}")
        self.pairs.set_attributes(self.spec.attributes if self.spec else [])
        self.settings.set_spec(self.spec)
        self.apply_device_defaults()

    def apply_device_defaults(self) -> None:
        """Steps, batch and AMP from the free memory of the chosen device (``finetune.default_settings``)."""
        from napari_dmoe.finetune import default_settings, free_memory

        device = self.devices.device() or "cpu"
        if device == "auto":
            device = "cuda" if self.devices.problems.get("cuda") is None else "cpu"
        dims = self.spec.spatial_dims if self.spec else 2
        defaults = default_settings(device, free_memory(device), dims)
        self.settings.apply(defaults)
        self.settings.set_spec(self.spec)

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
        return self.pairs.add_row(image, labels, attributes, validation)

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

    # -- run -------------------------------------------------------------------------------------------------
    def _on_run_clicked(self) -> None:
        if self.process is None:
            self.start()
        else:
            self.cancel()

    def start(self) -> Any:
        """Export the pairs, write the config, start ``dmoe train``; returns the TrainingProcess (or None)."""
        from napari_dmoe.finetune import append_csv_rows, build_config, export_pairs, pairs_from_layers, write_config
        from napari_dmoe.finetune_run import TrainingProcess, train_command

        if self.process is not None:
            show_info("A fine-tune is already running; cancel it first.")
            return None
        try:
            if self.spec is None:
                raise FinetuneError("pick a base model first (demo list, recent or Browse...)")
            pairs, is_val = pairs_from_layers(self.viewer.layers, self.pairs.rows(),
                                              self.settings.val_fraction.value(), bool(self.extra_csv.text().strip()))
            device = self.devices.device() or "cpu"
            settings = self.settings.settings(device, self.spec.spatial_dims)
            run_dir = Path(self.output.text()).expanduser().resolve() / time.strftime("run-%Y%m%d-%H%M%S")
            while run_dir.exists():  # two starts in one second
                run_dir = run_dir.with_name(run_dir.name + "x")
            export = export_pairs(pairs, run_dir / "data", self.spec, is_val)
            extra = append_csv_rows(export.csv_path, self.extra_csv.text().strip(), self.spec)
            base = self.models.path()
            config = build_config(base, self.spec, export, run_dir / "train", settings,
                                  name=f"finetune-{Path(base).stem}", n_train=len(export.train) + extra)
            config_path = write_config(config, run_dir / "finetune.yaml")
        except (ValueError, OSError) as err:  # FinetuneError, ImageWriteError, disk full...
            show_error(f"Cannot start the fine-tune: {err}")
            self.status.setText(f"Not started: {err}")
            return None
        provenance = {"data": export.to_dict(), "settings": vars(settings), "config": str(config_path)}
        (run_dir / "provenance.json").write_text(json.dumps(provenance, indent=1), encoding="utf-8")
        self.run_dir, self.new_model, self.comparison, self.last_checkpoint = run_dir, None, None, None
        self._launch = {"base": base, "csv": str(export.csv_path), "device": device, "output": run_dir / "train",
                        "steps": settings.steps}
        process = TrainingProcess(train_command(config_path, run_dir / "events.jsonl", device), run_dir,
                                  events=run_dir / "events.jsonl")
        process.start()
        self.process, self.phase = process, "train"
        self.errors.hide()
        self.compare.setRowCount(0)
        self.segment_button.setEnabled(False)
        self.plot.clear()
        self._close_progress()  # the napari progress bar is made at the first poll: creating one costs ~100 ms
        self.status.setText(f"Training on {len(export.train)} pair(s), validating on {len(export.val)} "
                            f"({', '.join(export.val)}); run folder {run_dir}")
        self._set_running(True)
        self.timer.start()
        return process

    def cancel(self) -> bool:
        """Ask, then stop the training process (terminate, then kill after a timeout). Returns whether it stops."""
        if self.process is None:
            return False
        if not self.confirm(self, "Stop the fine-tune? The last saved checkpoint is kept."):
            return False
        self.process.terminate()
        self._cancelled = True
        self._kill_at = time.monotonic() + KILL_AFTER_S
        self.run_button.setText(CANCELLING)
        self.run_button.setEnabled(False)
        return True

    def _set_running(self, running: bool) -> None:
        self.run_button.setText(CANCEL if running else START)
        self.run_button.setEnabled(True)
        for w in (self.models, self.devices, self.settings, self.add_button, self.add_result_button):
            w.setEnabled(not running)

    # -- polling ---------------------------------------------------------------------------------------------
    def poll(self) -> None:
        """Timer slot: read new events, update the progress bar and curves, handle the end of a process."""
        process = self.process
        if process is None:
            self.timer.stop()
            return
        events = process.poll()
        if self.phase == "train":
            self._show_progress(process, bool(events))
        if process.returncode is None:
            if self._kill_at is not None and time.monotonic() > self._kill_at:
                process.kill()  # did not stop on SIGTERM
                self._kill_at = None
            return
        if self.phase == "train":
            self._train_ended(process)
        else:
            self._compare_ended(process)

    def _show_progress(self, process: Any, changed: bool) -> None:
        state = process.state
        if self._pbar is None:
            self._pbar = progress(total=self._launch["steps"], desc="dMoE fine-tune: starting")
        if state.step:
            if state.total_steps and self._pbar.total != state.total_steps:
                self._pbar.total = state.total_steps
            eta = state.eta_seconds()
            loss = f"loss {state.losses[-1][1]:.3f}" if state.losses else ""
            self._pbar.set_description(f"dMoE fine-tune {loss}" + (f", ETA {eta:.0f} s" if eta is not None else ""))
            self._pbar.n = 0
            self._pbar.update(state.step)
        if changed or self.plot.pending:
            self.plot.update_curves(state.losses, state.val)

    def _close_progress(self) -> None:
        if self._pbar is not None:
            self._pbar.close()
        self._pbar = None

    def _checkpoint(self, state: Any) -> Path | None:
        out = Path(self._launch["output"])
        for candidate in (state.best, out / "best.safetensors", out / "last.safetensors"):
            if candidate and Path(candidate).is_file():
                return Path(candidate)
        return None

    def _train_ended(self, process: Any) -> None:
        state = process.state
        self.plot.update_curves(state.losses, state.val, force=True)
        self._close_progress()
        self.last_checkpoint = self._checkpoint(state)
        cancelled, self._cancelled, self._kill_at = self._cancelled, False, None
        if cancelled:
            kept = f"; last checkpoint kept: {self.last_checkpoint}" if self.last_checkpoint else ""
            self._finish(f"Cancelled at step {state.step}{kept}.")
            return
        failure = process.failure()
        if failure or self.last_checkpoint is None:
            self._fail("Fine-tune failed", failure or "the engine wrote no checkpoint", process.stderr_tail())
            return
        self._start_compare(self.last_checkpoint)

    def _start_compare(self, trained: Path) -> None:
        from napari_dmoe.finetune_run import compare_process

        process, out_model = compare_process(self.run_dir, self._launch["base"], trained, self._launch["csv"],
                                             self._launch["device"])
        process.start()
        self.process, self.phase = process, "compare"
        self.status.setText("Training done; comparing the base and the new model on the validation pairs...")

    def _compare_ended(self, process: Any) -> None:
        from napari_dmoe.finetune import compare_metrics
        from napari_dmoe.finetune_run import COMPARE_JSON
        from napari_dmoe.model_registry import RegistryError, add_recent

        result_path = self.run_dir / COMPARE_JSON
        if process.returncode != 0 or not result_path.is_file():
            self._fail("Comparing the models failed", process.failure() or "no result written",
                       process.stderr_tail())
            return
        self.comparison = json.loads(result_path.read_text(encoding="utf-8"))
        self.new_model = Path(self.comparison["model"])
        self.compare.show_rows(compare_metrics(self.comparison["before"], self.comparison["after"]))
        try:
            add_recent(self.new_model)  # the Segment widget's model list reads the recent list
        except RegistryError as err:
            show_warning(f"The new model could not be added to the recent list: {err}")
        self.models.refresh(select=self._launch["base"])
        if self.segment_widget is not None:
            self.segment_widget.models.refresh(select=str(self.new_model))
        self.segment_button.setEnabled(True)
        after = self.comparison["after"].get("all", float("nan"))
        before = self.comparison["before"].get("all", float("nan"))
        self._finish(f"Done: new model {self.new_model} (validation Dice {before:.3f} -> {after:.3f}).")

    def _fail(self, title: str, reason: str, tail: str) -> None:
        show_error(f"{title}: {reason}")
        self.errors.setPlainText(f"{title}: {reason}\n\n--- last lines of the process output ---\n{tail}")
        self.errors.show()
        self._finish(f"{title}: {reason}")

    def _finish(self, text: str) -> None:
        self.timer.stop()
        self._close_progress()
        self.process, self.phase = None, None
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
        if self.process is not None:
            self.process.stop(timeout=2.0)
            self._finish("Stopped: napari or the widget was closed.")

    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt name)
        self.stop_now()
        super().closeEvent(event)

