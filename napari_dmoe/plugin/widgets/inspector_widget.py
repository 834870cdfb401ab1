"""Routing inspector dock: the attribute x expert matrix of mean gate weights for one image, as a heatmap.

It reads the expert usage the segment widget stores in each mask layer's metadata, so it costs no inference:
segment an image under several attribute values (or press "Sweep all values") and the rows fill in.
"Folder of cases..." runs a model over a folder listed in a CSV (``sweep.iter_folder_usage``) in a worker
thread and adds one more entry to the picker: one row per attribute value, averaged over its cases.
"Export CSV..." (enabled while a folder entry is shown) saves that folder's per-case usage with
``sweep.write_folder_csv``: one row per case, skipped cases included with their reason.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generator

import numpy as np
from qtpy.QtWidgets import (
    QComboBox, QFileDialog, QFormLayout, QHBoxLayout, QLabel, QPushButton, QVBoxLayout, QWidget,
)

from napari_dmoe.plugin.widgets.controls import ModelPicker
from napari_dmoe.plugin.widgets.jobs import ModelCache, Step, advance
from napari_dmoe.plugin.results import RESULT_KEY

if TYPE_CHECKING:
    import napari

log = logging.getLogger(__name__)
FOLDER_BUTTON = "Folder of cases..."
EXPORT_BUTTON = "Export CSV..."
CANCEL = "Cancel"


def folder_job(cache: ModelCache, model_path: str, folder: str, csv: str, options: dict[str, Any]
               ) -> Generator[Step, None, tuple[Any, str | None]]:
    """Worker body (no Qt): load the model, run ``iter_folder_usage``; returns (FolderUsage or None, error)."""
    try:
        yield Step("loading model", 0, 0)
        from napari_dmoe.generators import relay
        from napari_dmoe.inference.sweep import iter_folder_usage

        gen = iter_folder_usage(cache.get(model_path), folder, csv, **options)
        usage = yield from relay(gen, lambda p: Step(f"{p.name} {p.stage}".strip(), p.done, p.total))
        return usage, None
    except (ValueError, OSError) as err:  # bad CSV, model, folder: messages written for users
        return None, str(err)
    except Exception as err:  # a bug: keep the viewer alive, log the traceback for the report
        log.exception("napari-dmoe folder usage failed")
        return None, f"unexpected {type(err).__name__}: {err} (see the terminal for the traceback)"


def _mask_records(viewer: Any) -> list[dict[str, Any]]:
    out = []
    for layer in viewer.layers:
        meta = layer.metadata.get(RESULT_KEY)
        if isinstance(meta, dict) and meta.get("kind") == "mask" and meta.get("expert_usage"):
            out.append(meta)
    return out


def _group(meta: dict[str, Any]) -> str:
    model = str(meta.get("model", "")).replace("\\", "/").rsplit("/", 1)[-1]
    return f"{meta.get('source_layer')} | {model}"


def _row_order(meta: dict[str, Any]) -> tuple:
    """Rows in vocabulary order, "unknown" last."""
    vocab = meta.get("spec", {}).get("attributes", {})
    key = []
    for name, value in meta.get("attribute_request", {}).items():
        values = vocab.get(name, [])
        key.append(values.index(value) if value in values else len(values))
    return tuple(key)


class RoutingInspector(QWidget):
    """Dock widget: pick an image (and model) that has results; see mean gate weight per attribute and expert."""

    def __init__(self, napari_viewer: "napari.viewer.Viewer") -> None:
        super().__init__()
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.viewer = getattr(napari_viewer, "__wrapped__", napari_viewer)
        self.groups = QComboBox()
        self.positions = QComboBox()
        self.figure = Figure(figsize=(4, 3), tight_layout=True)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.hint = QLabel()
        self.hint.setWordWrap(True)
        self.models = ModelPicker()  # for folders only: single images use the segment widget's results
        self.folder_button = QPushButton(FOLDER_BUTTON)
        self.folder_button.setToolTip("Segment every image listed in a CSV (columns: image, one per attribute) "
                                      "and show the mean expert usage per attribute value")
        self.folder_button.clicked.connect(self._on_folder_clicked)
        self.export_button = QPushButton(EXPORT_BUTTON)
        self.export_button.setToolTip("Save the folder shown: one row per case with its attribute, router, "
                                      "expert usage, and skipped cases with the reason")
        self.export_button.setEnabled(False)
        self.export_button.clicked.connect(lambda: self.export_csv())
        self.worker: Any = None
        self._pbar: Any = None
        self._cache = ModelCache()
        self._folders: dict[str, dict[str, Any]] = {}  # picker entry -> labels, matrix, cases, skipped
        form = QFormLayout()
        form.addRow("image | model", self.groups)
        form.addRow("routing position", self.positions)
        folder_row = QHBoxLayout()
        folder_row.addWidget(self.models, 1)
        folder_row.addWidget(self.folder_button)
        folder_row.addWidget(self.export_button)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(folder_row)
        layout.addWidget(self.canvas, 1)
        layout.addWidget(self.hint)
        self.groups.currentIndexChanged.connect(self._on_group_changed)
        self.positions.currentIndexChanged.connect(lambda _: self.draw())
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(self.refresh)
        self.refresh()

    def refresh(self, event: Any = None) -> None:
        """Re-read the result layers (called when layers are added or removed); a new result is shown at once."""
        current = self.groups.currentText()
        inserted = getattr(event, "value", None) if getattr(event, "type", None) == "inserted" else None
        meta = getattr(inserted, "metadata", {}).get(RESULT_KEY) if inserted is not None else None
        if isinstance(meta, dict) and meta.get("kind") == "mask" and meta.get("expert_usage"):
            current = _group(meta)  # follow the newest result
        groups = sorted({_group(m) for m in _mask_records(self.viewer)}) + list(self._folders)
        self.groups.blockSignals(True)
        self.groups.clear()
        self.groups.addItems(groups)
        self.groups.setCurrentIndex(max(self.groups.findText(current), 0))
        self.groups.blockSignals(False)
        self._on_group_changed()

    def _records(self) -> list[dict[str, Any]]:
        group = self.groups.currentText()
        records = [m for m in _mask_records(self.viewer) if _group(m) == group]
        return sorted(records, key=_row_order)

    def _on_group_changed(self, *_: Any) -> None:
        is_folder = self.groups.currentText() in self._folders
        self.export_button.setEnabled(is_folder)
        positions: list[str] = ["mean"] if is_folder else []
        for meta in self._records():
            positions += [p for p in meta["expert_usage"] if p not in positions]
        positions.sort(key=lambda p: (p != "mean", len(p), p))  # "mean" first, then block0, block1, ... block10
        current = self.positions.currentText()
        self.positions.blockSignals(True)
        self.positions.clear()
        self.positions.addItems(positions)
        self.positions.setCurrentIndex(max(self.positions.findText(current), 0))
        self.positions.blockSignals(False)
        self.draw()

    def matrix(self) -> tuple[list[str], np.ndarray]:
        """Row labels (attribute tags) and the ``[rows, experts]`` mean gate weights shown."""
        from napari_dmoe.inference.sweep import usage_matrix

        folder = self._folders.get(self.groups.currentText())
        if folder is not None:
            return list(folder["labels"]), folder["matrix"]
        rows = {}
        for meta in self._records():  # one row per tag: the latest layer of a tag wins
            rows[meta.get("tag", "")] = meta["expert_usage"]
        return usage_matrix(list(rows.items()), self.positions.currentText() or "mean")

    def draw(self) -> None:
        self.figure.clear()
        labels, matrix = self.matrix()
        if not labels:
            self._theme(None, None)
            self.hint.setText("No dMoE results yet: segment an image with the Segment widget "
                              "(the attribute sweep fills one row per attribute value).")
            self.canvas.draw_idle()
            return
        folder = self._folders.get(self.groups.currentText())
        if folder is None:
            self.hint.setText("Mean gate weight of each expert over the image; each row sums to 1. "
                              "Rows that differ show the attribute changes which experts do the work.")
        else:
            self.hint.setText(_folder_hint(folder))
        ax = self.figure.add_subplot(1, 1, 1)
        ax.set_title("mean gate weight per expert", fontsize=9)
        im = ax.imshow(matrix, cmap="viridis", vmin=0.0, vmax=max(float(matrix.max()), 1e-6), aspect="auto")
        ax.set_xticks(range(matrix.shape[1]), [str(e) for e in range(matrix.shape[1])])
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("expert")
        if matrix.size <= 80:  # numbers stay readable on small matrices
            for (i, j), v in np.ndenumerate(matrix):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v < 0.6 * matrix.max() else "black")
        bar = self.figure.colorbar(im, ax=ax, fraction=0.05)
        bar.set_label("mean gate weight")
        self._theme(ax, bar)
        self.canvas.draw_idle()

    def _theme(self, ax: Any | None, bar: Any | None) -> None:
        """Colours of napari's current theme, so the plot does not glare in a dark napari."""
        from napari.utils.theme import get_theme

        try:
            theme = get_theme(self.viewer.theme)
            background, text = theme.background.as_hex(), theme.text.as_hex()
        except (KeyError, ValueError, AttributeError):  # a custom theme without these colours
            return
        self.figure.set_facecolor(background)
        if ax is None:  # nothing drawn yet: an empty plot in the theme's colour, not a white box
            return
        for axes in (ax, bar.ax):
            axes.set_facecolor(background)
            axes.tick_params(colors=text, which="both")
            for spine in axes.spines.values():
                spine.set_color(text)
        for label in (ax.title, ax.xaxis.label, ax.yaxis.label, bar.ax.yaxis.label):
            label.set_color(text)

    # -- folder of cases -----------------------------------------------------------------------------------
    def _on_folder_clicked(self) -> None:
        if self.worker is not None:
            self.worker.quit()  # checked between two window batches
            return
        folder = QFileDialog.getExistingDirectory(self, "Folder of cases (images listed in a CSV)")
        if not folder:
            return
        csv, _ = QFileDialog.getOpenFileName(self, "CSV: column 'image' and one column per attribute", folder,
                                             "CSV files (*.csv);;All files (*)")
        if csv:
            self.inspect_folder(folder, csv)

    def inspect_folder(self, folder: str | Path, csv: str | Path, model_path: str | Path | None = None,
                       **options: Any) -> Any:
        """Run the model (the picker's, or ``model_path``) over the cases in ``csv``; returns the worker."""
        from napari.qt.threading import create_worker
        from napari.utils import progress
        from napari.utils.notifications import show_error, show_info

        if self.worker is not None:
            show_info("A folder is already being processed; cancel it first.")
            return None
        if model_path is not None:
            self.models.set_path(model_path)
        path = self.models.path()
        if not path:
            show_error("Cannot inspect a folder: pick a model first (demo list or Browse...)")
            return None
        entry = f"folder {Path(folder).name} | {Path(path).name}"
        worker = create_worker(folder_job, self._cache, path, str(folder), str(csv), options, _start_thread=False)
        worker.yielded.connect(self._on_folder_step)
        worker.returned.connect(lambda result, entry=entry, folder=folder: self._on_folder_result(entry, *result,
                                                                                                  folder=folder))
        worker.aborted.connect(lambda: self.hint.setText("Folder cancelled."))
        worker.finished.connect(self._on_folder_finished)
        self.worker = worker
        self._pbar = progress(total=0, desc=f"dMoE: {entry}")
        self.folder_button.setText(CANCEL)
        self.hint.setText(f"Segmenting the cases of {folder}...")
        worker.start()
        return worker

    def _on_folder_step(self, step: Step) -> None:
        advance(self._pbar, step)  # local read: progress events can run queued signals, even 'finished'

    def _on_folder_result(self, entry: str, usage: Any, error: str | None, folder: str | Path = "") -> None:
        from napari.utils.notifications import show_error, show_warning

        if error is not None:
            show_error(f"Folder of cases failed: {error}")
            self.hint.setText(f"Failed: {error}")
            return
        labels = [f"{label} (n={n})" for label, n in zip(usage.labels, usage.counts)]
        self._folders[entry] = {"labels": labels, "matrix": usage.matrix, "cases": sum(usage.counts),
                                "skipped": list(usage.errors), "usage": usage, "folder": str(folder)}
        if usage.errors:
            show_warning(f"{len(usage.errors)} case(s) skipped: " + ", ".join(n for n, _ in usage.errors))
        self.refresh()
        self.groups.setCurrentText(entry)  # emits currentIndexChanged -> draw (no-op when already current)
        self._on_group_changed()

    def export_csv(self, path: str | Path | None = None) -> Path | None:
        """Write the per-case CSV of the folder entry shown to ``path`` (asked with a dialog when None);
        returns the path written, or None when cancelled or refused (with a message)."""
        from napari.utils.notifications import show_error, show_info

        from napari_dmoe.inference.sweep import SweepError, write_folder_csv

        entry = self.groups.currentText()
        folder = self._folders.get(entry)
        if folder is None:
            show_error("Nothing to export: run 'Folder of cases...' and pick its entry first")
            return None
        if path is None:
            default = Path(folder["folder"] or ".") / f"{Path(folder['folder']).name or 'folder'}_expert_usage.csv"
            path, _ = QFileDialog.getSaveFileName(self, "Export expert usage per case", str(default),
                                                  "CSV files (*.csv);;All files (*)")
            if not path:
                return None
            if not Path(path).suffix:  # some platforms' dialogs do not add the filter's extension
                path = f"{path}.csv"
        try:
            written = write_folder_csv(folder["usage"], path)
        except SweepError as err:
            show_error(f"Export failed: {err}")
            return None
        show_info(f"Saved {len(folder['usage'].cases)} case(s) to {written}")
        self.hint.setText(_folder_hint(folder) + f" Exported to {written}.")
        return written

    def _on_folder_finished(self) -> None:
        if self._pbar is not None:
            self._pbar.close()
        self._pbar = None
        self.worker = None
        self.folder_button.setText(FOLDER_BUTTON)


def _folder_hint(folder: dict[str, Any]) -> str:
    text = (f"Mean gate weight of each expert over each image, averaged over the {folder['cases']} cases of "
            "each attribute value; each row sums to 1.")
    if folder["skipped"]:
        text += f" Skipped {len(folder['skipped'])}: " + "; ".join(f"{n} ({m})" for n, m in folder["skipped"])
    return text
