""""Run on: this computer / a server": segment through `dmoe serve` (a GPU box) instead of the local engine.

``RemoteOption`` is the control (where to run, server address, token, the server's model); the Segment widget
asks it for ``spec`` (the server model's spec, or None to use the local model picker) and ``job(...)`` (the worker
function and its arguments, or None to run locally). ``run_remote`` is that worker: no Qt, no torch, the same
``Step`` / ``JobResult`` the local jobs give, so progress, results and errors show the same way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generator, Sequence

from qtpy.QtCore import Signal
from qtpy.QtWidgets import QComboBox, QFormLayout, QHBoxLayout, QLabel, QLineEdit, QPushButton, QWidget

from napari_dmoe.plugin.widgets.jobs import JobResult, Step

LOCAL, SERVER = "this computer", "a server"


@dataclass
class RemoteModel:
    """What the result layers need of a model: its spec and where it lives (recorded in the provenance)."""

    spec: Any
    path: str


def run_remote(url: str, token: str | None, model_id: str, spec: Any, request: Any,
               attributes: Sequence[dict[str, str]]) -> Generator[Step, None, JobResult]:
    """Send the engine ``request`` (``inference.request.SegmentRequest``) to the server under each attribute."""
    import dataclasses

    from napari_dmoe.client import Client
    from napari_dmoe.inference.request import Provenance, as_array
    from napari_dmoe.model.spec import attribute_text

    result = JobResult(model=RemoteModel(spec, f"{url.rstrip('/')}/models/{model_id}"))
    try:
        client = Client(url, token)
        request = dataclasses.replace(request, image=as_array(request.image))
        for i, attribute in enumerate(attributes):
            tag = attribute_text(attribute)
            yield Step(f"{tag}: on the server", i, len(attributes))
            header, arrays = dataclasses.replace(request, attribute=dict(attribute)).to_wire(model_id)
            seg = client.send(header, arrays)
            result.segmentations[tag] = seg
            result.provenance[tag] = Provenance(
                model=f"{model_id} on {url.rstrip('/')}", attribute=dict(seg.attribute or {}), forced=seg.forced,
                fit_findings=seg.fit_findings, device=seg.device, warnings=seg.warnings,
                conversions=seg.conversions, settings=request.settings.to_dict())
            result.requests[tag] = dict(attribute)
        yield Step("done", len(attributes), len(attributes))
    except ValueError as err:  # ClientError / ServerError: one line saying what the server or network said
        result.error = str(err)
    return result


class RemoteOption(QWidget):
    """Where to segment. ``changed`` fires when the choice or the server's model changes."""

    changed = Signal()

    def __init__(self, parent: QWidget | None = None, local_picker: QWidget | None = None) -> None:
        super().__init__(parent)
        self.local_picker = local_picker  # the local model picker: greyed out while a server's model is used
        self.where = QComboBox()
        self.where.addItems([LOCAL, SERVER])
        self.url = QLineEdit("http://127.0.0.1:8765")
        self.token = QLineEdit()
        self.token.setEchoMode(QLineEdit.Password)
        self.token.setPlaceholderText("token (for a server on another computer)")
        self.connect_button = QPushButton("Connect")
        self.model = QComboBox()
        self.info = QLabel()
        self.info.setWordWrap(True)
        self._models: list[dict[str, Any]] = []
        self._server = QWidget()
        form = QFormLayout(self._server)
        form.setContentsMargins(0, 0, 0, 0)
        row = QHBoxLayout()
        row.addWidget(self.url, 1)
        row.addWidget(self.connect_button)
        form.addRow("server", row)
        form.addRow("token", self.token)
        form.addRow("server model", self.model)
        form.addRow(self.info)
        layout = QFormLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addRow(self.where)
        layout.addRow(self._server)
        self._server.setVisible(False)
        self.where.currentIndexChanged.connect(self._on_where)
        self.connect_button.clicked.connect(self.connect_server)
        self.model.currentIndexChanged.connect(lambda _: self._on_model())

    @property
    def remote(self) -> bool:
        return self.where.currentText() == SERVER

    @property
    def spec(self) -> Any:
        """The chosen server model's spec, or None (run locally, or not connected yet)."""
        info = self._current()
        if not self.remote or info is None:
            return None
        from napari_dmoe.model.spec import ModelSpec

        return ModelSpec.from_dict(info["spec"])

    @property
    def model_ref(self) -> str | None:
        """The chosen server model as result provenance names it (``<url>/models/<id>``), or None."""
        info = self._current()
        return f"{self.url.text().rstrip('/')}/models/{info['id']}" if self.remote and info is not None else None

    def job(self, request: Any, attributes: Sequence[dict[str, str]]) -> tuple | None:
        """``(function, *args)`` for a worker that runs on the server, or None to run locally."""
        info = self._current()
        if not self.remote or info is None:
            return None
        return (run_remote, self.url.text(), self.token.text() or None, info["id"], self.spec, request,
                list(attributes))

    def connect_server(self) -> bool:
        """Ask the server for its models (quick: /models); say what went wrong otherwise."""
        from napari_dmoe.client import Client, describe_model

        try:
            self._models = Client(self.url.text(), self.token.text() or None, timeout=20).list_models()
            self.info.setText(f"{len(self._models)} model(s) on the server")
        except ValueError as err:
            self._models = []
            self.info.setText(str(err))
        self.model.blockSignals(True)
        self.model.clear()
        self.model.addItems([m["id"] for m in self._models])
        self.model.blockSignals(False)
        if self._models:
            self.info.setText(describe_model(self._models[0]))
        self.changed.emit()
        return bool(self._models)

    def _current(self) -> dict[str, Any] | None:
        i = self.model.currentIndex()
        return self._models[i] if 0 <= i < len(self._models) else None

    def _on_where(self, _: int) -> None:
        self._server.setVisible(self.remote)
        if self.local_picker is not None:
            self.local_picker.setEnabled(not self.remote)
        self.changed.emit()

    def _on_model(self) -> None:
        from napari_dmoe.client import describe_model

        info = self._current()
        self.info.setText(describe_model(info) if info else "")
        self.changed.emit()
