"""Widget settings that outlive a napari session (model, device, advanced and fine-tune options), in QSettings.

As napari-nninteractive does: one QSettings store under the organisation/application "napari-dmoe", or an INI file
in ``$NAPARI_DMOE_CONFIG_DIR`` when that is set (tests point it at a temporary folder; shared machines at a
per-user one). Values are read back with the type of the default, so a damaged entry falls back to the default.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from qtpy.QtCore import QSettings
from qtpy.QtWidgets import QCheckBox, QComboBox, QDoubleSpinBox, QLineEdit, QSpinBox, QWidget

from napari_dmoe.io.model_list import CONFIG_ENV

ORGANIZATION = APPLICATION = "napari-dmoe"


def store() -> QSettings:
    folder = os.environ.get(CONFIG_ENV)
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        return QSettings(str(Path(folder) / "widgets.ini"), QSettings.Format.IniFormat)
    return QSettings(ORGANIZATION, APPLICATION)


def read(key: str, default: Any) -> Any:
    value = store().value(key, default)
    try:
        if isinstance(default, bool):
            return value if isinstance(value, bool) else str(value).lower() in ("true", "1")
        return type(default)(value) if default is not None else value
    except (TypeError, ValueError):
        return default


def write(key: str, value: Any) -> None:
    s = store()
    s.setValue(key, value)
    s.sync()


def _value(widget: QWidget) -> Any:
    if isinstance(widget, QCheckBox):
        return widget.isChecked()
    if isinstance(widget, (QSpinBox, QDoubleSpinBox)):
        return widget.value()
    if isinstance(widget, QLineEdit):
        return widget.text()
    if isinstance(widget, QComboBox):
        return widget.currentText()
    raise TypeError(f"cannot persist a {type(widget).__name__}")


def _restore(widget: QWidget, value: Any) -> None:
    if isinstance(widget, QCheckBox):
        widget.setChecked(bool(value))
    elif isinstance(widget, (QSpinBox, QDoubleSpinBox)):
        widget.setValue(value)
    elif isinstance(widget, QLineEdit):
        widget.setText(str(value))
    elif isinstance(widget, QComboBox) and widget.findText(str(value)) >= 0:
        widget.setCurrentIndex(widget.findText(str(value)))


def persist(group: str, widgets: dict[str, QWidget]) -> None:
    """Restore each widget's saved value under ``group/name`` now, and save it whenever the user changes it."""
    for name, widget in widgets.items():
        key = f"{group}/{name}"
        _restore(widget, read(key, _value(widget)))
        signal = (widget.toggled if isinstance(widget, QCheckBox) else widget.textChanged
                  if isinstance(widget, QLineEdit) else widget.currentTextChanged
                  if isinstance(widget, QComboBox) else widget.valueChanged)
        signal.connect(lambda *_, key=key, widget=widget: write(key, _value(widget)))
