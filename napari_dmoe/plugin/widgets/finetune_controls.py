"""Qt building blocks of the fine-tune widget: the pairs table, the settings form, the before/after table.

Each block exposes plain values; ``finetune_widget.py`` wires them. torch is never imported here. The live curves
and the stall meter live in ``finetune_monitor.py`` (re-exported here, where the bench script imports them).
"""
from __future__ import annotations

from typing import Any, Sequence

from qtpy.QtGui import QColor
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QHeaderView,
    QLineEdit,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QWidget,
)

from napari_dmoe.plugin.widgets.finetune_monitor import CurvePlot
from napari_dmoe.finetune.prepare import FinetuneError, FinetuneSettings

__all__ = ["PairTable", "SettingsForm", "CompareTable", "CurvePlot", "TRAINABLE"]

# what to train: "auto" is group-local when the pairs cover some groups only, else all (prepare.default_trainable)
TRAINABLE = {"automatic (group-local unless every group is corrected)": "auto",
             "group-local: only the corrected groups change": "group_local",
             "routers and experts (every group may change)": "routers_experts",
             "all weights (every group may change)": "all"}


ROW_HEIGHT, MIN_ROWS = 28, 5


class PairTable(QTableWidget):
    """Rows of (image layer, labels layer, one value per attribute, validation flag)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(0, 3, parent)
        self.attributes: list[Any] = []  # spec.attributes of the base model
        self.image_names: list[str] = []
        self.labels_names: list[str] = []
        self.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.verticalHeader().setDefaultSectionSize(ROW_HEIGHT)
        # at least MIN_ROWS rows visible without scrolling
        self.setMinimumHeight(self.horizontalHeader().sizeHint().height() + MIN_ROWS * ROW_HEIGHT + 6)
        self._set_headers()

    def _set_headers(self) -> None:
        names = ["image", "labels", *[a.name for a in self.attributes], "validation"]
        self.setColumnCount(len(names))
        self.setHorizontalHeaderLabels(names)
        header = self.horizontalHeader()
        for col in range(len(names)):  # layer names get the room; attribute and flag columns fit their content
            header.setSectionResizeMode(col, QHeaderView.ResizeMode.Stretch if col < 2
                                        else QHeaderView.ResizeMode.ResizeToContents)

    def set_attributes(self, attributes: Sequence[Any]) -> None:
        """New vocabulary (another base model): keep the layer choices, reset attribute cells."""
        rows = [(self.cellWidget(r, 0).currentText(), self.cellWidget(r, 1).currentText(),
                 self.validation_flag(r)) for r in range(self.rowCount())]
        old = [self.row_attributes(r) for r in range(self.rowCount())]
        self.attributes = list(attributes)
        self.setRowCount(0)
        self._set_headers()
        for (image, labels, val), attrs in zip(rows, old):
            self.add_row(image, labels, attrs, val)

    def set_layer_names(self, images: Sequence[str], labels: Sequence[str]) -> None:
        self.image_names, self.labels_names = list(images), list(labels)
        for r in range(self.rowCount()):
            for col, names in ((0, self.image_names), (1, self.labels_names)):
                combo: QComboBox = self.cellWidget(r, col)
                current = combo.currentText()
                combo.blockSignals(True)
                combo.clear()
                combo.addItems(names)
                combo.setCurrentIndex(max(combo.findText(current), 0))
                combo.blockSignals(False)

    def add_row(self, image: str | None = None, labels: str | None = None,
                attributes: dict[str, str] | None = None, validation: bool = False) -> int:
        row = self.rowCount()
        self.insertRow(row)
        for col, (names, value) in enumerate(((self.image_names, image), (self.labels_names, labels))):
            combo = QComboBox()
            combo.addItems(names)
            combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
            combo.setMinimumContentsLength(10)
            if value is not None:
                combo.setCurrentIndex(max(combo.findText(value), 0))
            combo.setToolTip(combo.currentText())  # the full layer name when the column is narrow
            combo.currentTextChanged.connect(combo.setToolTip)
            self.setCellWidget(row, col, combo)
        for i, attr in enumerate(self.attributes):
            combo = QComboBox()
            combo.addItems(list(attr.values))
            value = (attributes or {}).get(attr.name)
            if value in attr.values:
                combo.setCurrentIndex(attr.values.index(value))
            self.setCellWidget(row, 2 + i, combo)
        check = QCheckBox()
        check.setChecked(validation)
        check.setToolTip("Hold this pair back for validation (when none is ticked, 20 % are chosen at random)")
        self.setCellWidget(row, 2 + len(self.attributes), check)
        return row

    def remove_selected(self) -> None:
        for row in sorted({i.row() for i in self.selectedIndexes()}, reverse=True):
            self.removeRow(row)

    def row_attributes(self, row: int) -> dict[str, str]:
        return {a.name: self.cellWidget(row, 2 + i).currentText() for i, a in enumerate(self.attributes)}

    def set_row_attribute(self, row: int, name: str, value: str) -> None:
        i = [a.name for a in self.attributes].index(name)
        combo: QComboBox = self.cellWidget(row, 2 + i)
        if combo.findText(value) < 0:
            raise FinetuneError(f"{name}={value!r} is not in the base model's vocabulary")
        combo.setCurrentIndex(combo.findText(value))

    def validation_flag(self, row: int) -> bool:
        return self.cellWidget(row, self.columnCount() - 1).isChecked()

    def set_validation(self, row: int, value: bool) -> None:
        self.cellWidget(row, self.columnCount() - 1).setChecked(value)

    def rows(self) -> list[tuple[str, str, dict[str, str], bool]]:
        """(image layer name, labels layer name, attributes, validation) per row."""
        return [(self.cellWidget(r, 0).currentText(), self.cellWidget(r, 1).currentText(), self.row_attributes(r),
                 self.validation_flag(r)) for r in range(self.rowCount())]


class SettingsForm(QWidget):
    """Steps, learning rate, batch, patch size, what to train, mixed precision, validation fraction."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.steps = QSpinBox()
        self.steps.setRange(1, 1_000_000)
        self.lr = QDoubleSpinBox()
        self.lr.setDecimals(5)
        self.lr.setRange(1e-5, 1.0)
        self.lr.setSingleStep(0.0005)
        self.lr.setToolTip("The learning rate the run uses. Left untouched it follows what will train: a "
                           "group-local run (Adam on the corrected groups' private weights) has its own default")
        self.batch = QSpinBox()
        self.batch.setRange(1, 256)
        self.patch = QLineEdit()
        self.patch.setToolTip("Training patch size (3D models); 2D models train at their input size")
        self.trainable = QComboBox()
        self.trainable.addItems(list(TRAINABLE))
        self.trainable.setToolTip("Group-local: only the corrected groups' routers and their own copies of the "
                                  "experts learn; every other group keeps exactly the base model's masks. The other "
                                  "choices change weights every group shares and may make the others worse")
        self.amp = QCheckBox("mixed precision (CUDA only)")
        self.keep_base = QCheckBox("keep the base model unless training beats it")
        self.keep_base.setToolTip("Group-local: cross-validation over your pairs scores the base model too, and when "
                                  "no number of steps improves them on average no new model is made. Other modes: "
                                  "the base is validated on the held-back pairs first, and kept unless a step beats it")
        self.val_fraction = QDoubleSpinBox()
        self.val_fraction.setRange(0.05, 0.9)
        self.val_fraction.setSingleStep(0.05)
        self.val_fraction.setValue(0.2)
        self.val_fraction.setToolTip("Share of pairs held back for validation when no row is ticked (at least 1)")
        form = QFormLayout(self)
        form.setContentsMargins(0, 0, 0, 0)
        form.addRow("steps", self.steps)
        form.addRow("learning rate", self.lr)
        form.addRow("batch", self.batch)
        form.addRow("patch size", self.patch)
        form.addRow("train", self.trainable)
        form.addRow(self.amp)
        form.addRow(self.keep_base)
        form.addRow("validation share", self.val_fraction)
        self.apply(FinetuneSettings())

    def apply(self, settings: FinetuneSettings) -> None:
        self.steps.setValue(settings.steps)
        self.lr.setValue(settings.lr)
        self._auto = (self.steps.value(), self.lr.value())  # what we set: the user has not changed these
        self.batch.setValue(settings.batch_size)
        self.amp.setChecked(settings.amp)
        self.keep_base.setChecked(settings.keep_base)
        if settings.patch_size:
            self.patch.setText(",".join(str(s) for s in settings.patch_size))

    def follow(self, settings: FinetuneSettings) -> None:
        """Show the steps and learning rate of the mode that will run (``settings``: its defaults), unless the
        user changed them: what the form shows is what the run uses."""
        if (self.steps.value(), self.lr.value()) == getattr(self, "_auto", None):
            self.apply_steps_lr(settings)

    def apply_steps_lr(self, settings: FinetuneSettings) -> None:
        self.steps.setValue(settings.steps)
        self.lr.setValue(settings.lr)
        self._auto = (self.steps.value(), self.lr.value())

    def show_validation_share(self, used: bool) -> None:
        self.val_fraction.setEnabled(used)
        self.val_fraction.setToolTip(
            "Share of pairs held back for validation when no row is ticked (at least 1)" if used else
            "Not used by a group-local run: cross-validation holds every pair back in turn, then trains on all")

    def set_spec(self, spec: Any | None) -> None:
        """Patch size follows the base model: fixed for 2D (the TransUNet's input size), editable for 3D."""
        if spec is None:
            return
        self.patch.setText(",".join(str(s) for s in spec.input_size))
        self.patch.setEnabled(spec.spatial_dims == 3)
        modes = list(TRAINABLE.values())
        usable = {"auto": True, "all": True, "routers_experts": spec.routing != "none",
                  "group_local": spec.routing == "dmoe"}
        for i, mode in enumerate(modes):
            self.trainable.model().item(i).setEnabled(usable[mode])
        if not usable[modes[self.trainable.currentIndex()]]:
            self.trainable.setCurrentIndex(0)

    def settings(self, device: str, spatial_dims: int) -> FinetuneSettings:
        text = self.patch.text().strip()
        try:
            patch = [int(v) for v in text.replace("x", ",").split(",") if v.strip()] if text else None
        except ValueError:
            patch = []
        if patch is not None and (len(patch) != spatial_dims or min(patch) < 1):
            raise FinetuneError(f"patch size {text!r}: give {spatial_dims} positive integers separated by commas")
        return FinetuneSettings(steps=self.steps.value(), lr=float(self.lr.value()), batch_size=self.batch.value(),
                                patch_size=patch, device=device, trainable=TRAINABLE[self.trainable.currentText()],
                                amp=self.amp.isChecked() and device.startswith(("cuda", "auto")),
                                keep_base=self.keep_base.isChecked())


def _change_text(row: dict[str, Any]) -> str:
    """"+0.150 +- 0.040" for a cross-validated estimate (spread over folds), "+0.012" for a measured change."""
    change, sd = row.get("change"), row.get("change_sd")
    if change is None:
        return "-"
    return f"{change:+.3f}" + (f" \u00b1 {sd:.3f}" if sd is not None else "")


class CompareTable(QTableWidget):
    """Every group of the model before and after the fine-tune (``finetune.compare.group_rows``): Dice on the
    held-back pairs or the demo's reference set, how much the masks changed where there are no labels, a flag."""

    COLUMNS = ("group", "measured on", "before", "after", "change", "masks agree", "flag")

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(0, len(self.COLUMNS), parent)
        self.setHorizontalHeaderLabels(self.COLUMNS)
        self.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.verticalHeader().hide()
        self.setToolTip("Every group of the model. 'masks agree': mean Dice between the base and the new model's "
                        "masks on that group's images (no labels needed); 1.000 = unchanged")

    def show_groups(self, rows: Sequence[dict[str, Any]]) -> None:
        num = lambda v, f="{:.3f}": "-" if v is None else f.format(v)  # noqa: E731
        self.setRowCount(0)
        for row in rows:
            r = self.rowCount()
            self.insertRow(r)
            agree = row.get("agreement")
            texts = (row["group"] + (" (corrected)" if row.get("corrected") else ""),
                     f"{row['source']} ({row['n']})" if row.get("n") else row["source"],
                     num(row.get("before")), num(row.get("after")), _change_text(row),
                     "-" if agree is None else f"{agree:.3f} (n={row.get('agreement_n', 0)})",
                     {"worse": "WORSE", "changed": "masks changed"}.get(row.get("flag"), "ok"))
            for c, text in enumerate(texts):
                item = QTableWidgetItem(text)
                if row.get("measured_on"):  # a cross-validated estimate: say what it was measured on
                    item.setToolTip(f"Expected change, measured on {row['measured_on']}; +- the spread over folds")
                if row.get("flag"):
                    item.setForeground(QColor("#ff6b6b"))
                self.setItem(r, c, item)
        self.resizeColumnsToContents()
        # every group visible without scrolling: the point of the table is that none is hidden
        self.setMinimumHeight(self.horizontalHeader().height() + sum(self.rowHeight(i) for i in range(len(rows)))
                              + 2 * self.frameWidth() + self.horizontalScrollBar().sizeHint().height())

    def values(self) -> list[list[str]]:
        return [[self.item(r, c).text() for c in range(self.columnCount())] for r in range(self.rowCount())]
