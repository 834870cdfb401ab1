"""Small Qt building blocks of the segment widget: model, device, attributes and advanced options.

Each block owns its widgets and exposes plain values; the segment widget wires them together. torch and the
core are imported only when a model is picked or the device list is filled.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QWidget,
)
from superqt import QCollapsible

from napari_dmoe.inference.patient import FROM_DICOM, FROM_SAMPLE, FROM_USER, NOT_KNOWN  # light: no torch

UNKNOWN = "unknown"
DEVICES = ("auto", "cpu", "cuda", "mps")


class OptionError(ValueError):
    """A value typed into the widget cannot be used; the message says what to type instead."""


class ModelList(QObject):
    """The one live list of models (bundled, then recent: ``io.model_list``) that every model picker shows, so
    a model one widget adds (a fine-tune's new model, a file browsed to) is listed in every other widget at once.
    One per Qt application (held by it, found by name), as the recent list it mirrors is one per user."""

    changed = Signal()
    NAME = "napari-dmoe-model-list"

    @classmethod
    def shared(cls) -> ModelList:
        from qtpy.QtWidgets import QApplication

        app = QApplication.instance()
        found = app.findChild(cls, cls.NAME) if app is not None else None
        if found is None:
            found = cls(app)
            found.setObjectName(cls.NAME)
        return found

    def entries(self) -> list[Any]:
        from napari_dmoe.io.model_list import list_models

        return list_models()

    def bundled_for(self, names: set[str]) -> Any:
        """The first demo model conditioned on exactly the attributes ``names`` (a ``ModelEntry``), or None."""
        from napari_dmoe.io.checkpoint import read_spec
        from napari_dmoe.io.model_list import bundled_models

        for entry in bundled_models():
            try:
                if {a.name for a in read_spec(entry.path).attributes} == set(names):
                    return entry
            except ValueError:  # a damaged demo file: the next one may do
                continue
        return None

    def add(self, path: str | Path) -> None:
        """Remember ``path`` in the recent list and tell every picker (RegistryError when it is not a file)."""
        from napari_dmoe.io.model_list import add_recent

        add_recent(path)
        self.changed.emit()


class ModelPicker(QWidget):
    """Bundled demo models and recent files in a dropdown (the shared ``ModelList``), plus "Browse..." for any
    model file."""

    changed = Signal(str)  # path of the shown model ("" when none), however it came to be shown
    chosen = Signal(str)  # path of a model the user chose (dropdown, Browse..., ``set_path``): worth remembering

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.models = ModelList.shared()
        self.combo = QComboBox()
        self.combo.setToolTip("Demo models shipped with napari-dmoe and models you opened recently")
        self.browse = QPushButton("Browse...")
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.combo, 1)
        layout.addWidget(self.browse)
        self.browse.clicked.connect(self._browse)
        self.combo.currentIndexChanged.connect(lambda _: self.changed.emit(self.path()))
        self.combo.activated.connect(lambda _: self.chosen.emit(self.path()))
        self.models.changed.connect(self._on_list_changed)
        self.refresh()

    def path(self) -> str:
        return self.combo.currentData() or ""

    def _on_list_changed(self) -> None:
        """Another widget added a model: list it, keep this picker's choice (and say nothing if it stays)."""
        current = self.path()
        self.refresh(select=current or None, quiet=True)
        if self.path() != current:
            self.changed.emit(self.path())

    def refresh(self, select: str | None = None, quiet: bool = False) -> None:
        self.combo.blockSignals(True)
        self.combo.clear()
        for entry in self.models.entries():
            self.combo.addItem(entry.label, str(entry.path))
            self.combo.setItemData(self.combo.count() - 1, str(entry.path), 3)  # 3 = ToolTipRole
        if select is not None and str(select) not in [self.combo.itemData(i) for i in range(self.combo.count())]:
            self.combo.addItem(f"file: {Path(select).stem}", str(select))  # e.g. a file not kept in recent
        if self.combo.count() == 0:
            self.combo.addItem("(no model: use Browse...)", "")
        if select is not None:
            self.combo.setCurrentIndex(max(self.combo.findData(str(select)), 0))
        self.combo.blockSignals(False)
        if not quiet:
            self.changed.emit(self.path())

    def set_path(self, path: str | Path) -> None:
        """Select ``path`` (remembered in the shared recent list when it is a readable file), as the user's choice."""
        from napari_dmoe.io.model_list import RegistryError

        resolved = str(Path(path).expanduser().resolve())
        try:
            self.models.add(path)  # every picker lists it; this one also selects it below
        except RegistryError:
            pass  # still selected below, so the user gets the loader's precise error about the file
        self.refresh(select=resolved)
        self.chosen.emit(self.path())

    def _browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open a napari-dmoe model", "", "dMoE models (*.safetensors)")
        if path:
            self.set_path(path)


class DevicePicker(QWidget):
    """auto / cpu / cuda / mps, with cuda:0, cuda:1, ... when there are several GPUs. Devices this machine cannot
    use are greyed out (the reason in their tooltip) and one plain sentence says when there is no GPU at all."""

    NO_GPU = "No GPU found: segmentation runs on the CPU, which is slower."

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        import torch

        from napari_dmoe.devices import cuda_problem, mps_problem

        self.combo = QComboBox()
        self.reason = QLabel()
        self.reason.setWordWrap(True)
        problems = {"auto": None, "cpu": None, "cuda": cuda_problem(), "mps": mps_problem()}
        n_gpus = torch.cuda.device_count() if problems["cuda"] is None else 0
        cuda = [f"cuda:{i}" for i in range(n_gpus)] if n_gpus > 1 else ["cuda"]
        for name in ("auto", "cpu", *cuda, "mps"):
            problem = problems[name.split(":")[0]]
            self.combo.addItem(name if problem is None else f"{name} (unavailable)", name)
            if problem:
                item = self.combo.model().item(self.combo.count() - 1)
                item.setEnabled(False)
                item.setToolTip(problem)
        self.problems = problems
        layout = QFormLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addRow(self.combo)
        layout.addRow(self.reason)
        self.combo.currentIndexChanged.connect(self._explain)
        self._explain()

    def device(self) -> str:
        return self.combo.currentData()

    def set_device(self, name: str) -> None:
        """Select ``name`` when this machine can use it (a saved "cuda:1" on a one-GPU machine is ignored)."""
        index = self.combo.findData(name)
        if index >= 0 and self.combo.model().item(index).isEnabled():
            self.combo.setCurrentIndex(index)

    def _explain(self) -> None:
        no_gpu = bool(self.problems["cuda"] and self.problems["mps"])
        self.reason.setText(self.NO_GPU if no_gpu else "")
        self.reason.setToolTip("; ".join(f"{n}: {p}" for n, p in self.problems.items() if p))
        self.reason.setVisible(no_gpu)


class AttributeForm(QWidget):
    """One dropdown per attribute the model is conditioned on (its vocabulary plus "unknown"), and beside it where
    the value came from: the sample, the DICOM header, the user, or nobody ("not known")."""

    changed = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.form = QFormLayout(self)
        self.form.setContentsMargins(0, 0, 0, 0)
        self.combos: dict[str, QComboBox] = {}
        self.sources: dict[str, QLabel] = {}

    def set_spec(self, spec: Any | None, found: Mapping[str, Any] | None = None) -> None:
        """Rows for ``spec``'s attributes; ``found``: name -> (value, source) the image gives (or name -> value)."""
        while self.form.rowCount():
            self.form.removeRow(0)
        self.combos, self.sources = {}, {}
        if spec is None:
            return
        used = spec.routing == "dmoe"
        for attr in spec.attributes:
            combo = QComboBox()
            combo.addItems([*attr.values, UNKNOWN])
            combo.setEnabled(used)
            combo.setToolTip("Patient attribute: picks the router of the experts ('unknown' averages all routers)"
                             if used else f"this model ({spec.routing}) does not use the attribute")
            source = QLabel()
            row = QHBoxLayout()
            row.addWidget(combo, 1)
            row.addWidget(source)
            self.form.addRow(attr.name, row)
            self.combos[attr.name], self.sources[attr.name] = combo, source
            combo.activated.connect(lambda _, name=attr.name: self._set_source(name, FROM_USER))
        self.apply(found or {})

    def apply(self, found: Mapping[str, Any]) -> None:
        """Show the image's values (name -> (value, source)); every other attribute goes back to "unknown", so a
        value chosen for the previous image is never carried over to this one."""
        for name, combo in self.combos.items():
            value, source = found.get(name, (UNKNOWN, NOT_KNOWN))
            if isinstance(found.get(name), str):
                value, source = found[name], FROM_SAMPLE
            index = combo.findText(str(value))
            combo.setCurrentIndex(index if index >= 0 else combo.count() - 1)
            self._set_source(name, source if index >= 0 else NOT_KNOWN)

    def _set_source(self, name: str, source: str) -> None:
        label = self.sources[name]
        unknown = self.combos[name].currentText() == UNKNOWN
        text = "not known: choose" if unknown and source != FROM_USER else source
        label.setText(text)
        label.setProperty("source", source)
        label.setStyleSheet("color: #f0a030; font-weight: bold;" if unknown else "color: palette(mid);")
        label.setToolTip({FROM_SAMPLE: "read from the sample's metadata", FROM_DICOM: "read from the DICOM header",
                          FROM_USER: "chosen by you for this image"}.get(
            source, "the image does not say; choose a value, or leave 'unknown' to average all routers"))
        self.changed.emit()

    def source(self, name: str) -> str:
        return str(self.sources[name].property("source"))

    def values(self) -> dict[str, str]:
        return {name: combo.currentText() for name, combo in self.combos.items()}

    def set_value(self, name: str, value: str, source: str = FROM_USER) -> None:
        combo = self.combos[name]
        index = combo.findText(value)
        if index < 0:
            raise OptionError(f"{name}={value!r} is not in this model's vocabulary")
        combo.setCurrentIndex(index)
        self._set_source(name, source)


class AdvancedOptions(QCollapsible):
    """Window size, overlap, window batch, AMP, routing maps and which routing position to show."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__("Advanced", parent)
        body = QWidget()
        form = QFormLayout(body)
        self.roi = QLineEdit()
        self.roi.setPlaceholderText("model default")
        self.roi.setToolTip("Tiling: sliding-window size in pixels/voxels, e.g. 96,96,96 (3D) or 224,224 (2D); "
                            "smaller windows need less memory (try it after an out-of-memory error)")
        self.overlap = QDoubleSpinBox()
        self.overlap.setRange(0.0, 0.9)
        self.overlap.setSingleStep(0.05)
        self.overlap.setValue(0.25)
        self.batch = QSpinBox()
        self.batch.setRange(1, 64)
        self.batch.setValue(4)
        self.batch.setToolTip("Tiling: windows per forward pass; lower it after an out-of-memory error (it is also "
                              "halved automatically on GPU out-of-memory)")
        self.amp = QCheckBox("mixed precision on CUDA")
        self.amp.setChecked(True)
        self.maps = QCheckBox("compute expert heatmaps")
        self.maps.setChecked(True)
        self.position = QComboBox()
        self.position.setToolTip("Which dMoE position the heatmaps and dominant expert show")
        self.set_positions([])
        tiling = QLabel("Tiling (lower both if the GPU or memory runs out)")
        tiling.setWordWrap(True)
        form.addRow(tiling)
        form.addRow("window size", self.roi)
        form.addRow("overlap", self.overlap)
        form.addRow("window batch", self.batch)
        form.addRow(self.amp)
        form.addRow(self.maps)
        form.addRow("routing position", self.position)
        self.addWidget(body)

    def persist(self, group: str) -> None:
        """Keep these options between napari sessions (QSettings, see ``settings``)."""
        from napari_dmoe.plugin.widgets import settings

        settings.persist(group, {"window_size": self.roi, "overlap": self.overlap, "window_batch": self.batch,
                                 "amp": self.amp, "maps": self.maps})

    def set_positions(self, positions: list[str]) -> None:
        current = self.position.currentText()
        self.position.clear()
        self.position.addItems(["mean", *positions])
        self.position.setCurrentIndex(max(self.position.findText(current), 0))

    def roi_size(self, ndim: int) -> list[int] | None:
        text = self.roi.text().strip()
        if not text:
            return None
        try:
            sizes = [int(v) for v in text.replace("x", ",").split(",") if v.strip()]
        except ValueError:
            sizes = []
        if len(sizes) != ndim or min(sizes, default=0) < 1:
            raise OptionError(f"window size {text!r}: give {ndim} positive integers separated by commas "
                              f"(e.g. {','.join(['96'] * ndim)}), or leave it empty for the model default")
        return sizes

    def options(self, spatial_dims: int) -> dict[str, Any]:
        """The engine settings chosen here (``inference.request.EngineSettings`` fields)."""
        roi = self.roi_size(spatial_dims)
        return {"roi_size": tuple(roi) if roi else None, "overlap": float(self.overlap.value()),
                "window_batch": int(self.batch.value()), "amp": self.amp.isChecked(),
                "routing": "auto" if self.maps.isChecked() else "none"}
