"""The fine-tune form shows the steps and learning rate the run will use (issue 23 item 5): untouched, they follow
the mode that will train (group-local has its own recipe); typed by the user, they are kept. No training runs."""
from __future__ import annotations

import importlib.util

import pytest

if importlib.util.find_spec("napari") is None:
    pytest.skip("napari is not installed", allow_module_level=True)
pytestmark = pytest.mark.gui

from test_finetune_widget import add_cases, base_model, fill_pairs, make_widget  # noqa: E402,F401


def _select(widget, mode: str) -> None:
    from napari_dmoe.plugin.widgets.finetune_controls import TRAINABLE

    widget.settings.trainable.setCurrentIndex(list(TRAINABLE.values()).index(mode))


def test_the_learning_rate_shown_is_the_one_used(make_napari_viewer, base_model, tmp_path):  # noqa: F811
    from napari_dmoe.finetune.prepare import default_settings

    viewer = make_napari_viewer()
    add_cases(viewer, 2)  # Asian and Black: White has no corrected case, so "automatic" means group-local
    widget = make_widget(viewer, base_model, tmp_path)
    widget.confirm = lambda *args, **kwargs: True  # the full fine-tune asks first; say yes
    local, full = (default_settings("cpu", None, 2, mode) for mode in ("group_local", "all"))
    assert local.lr != full.lr  # else this test would prove nothing
    fill_pairs(widget, 2)
    assert widget.settings.lr.value() == pytest.approx(local.lr)
    assert widget.settings.steps.value() == local.steps
    request = widget._request()
    assert request.settings.trainable == "group_local"
    assert request.settings.lr == pytest.approx(widget.settings.lr.value())
    assert request.settings.steps == widget.settings.steps.value() and request.settings.folds == local.folds
    assert not widget.settings.val_fraction.isEnabled()  # group-local cross-validates on every pair

    _select(widget, "all")  # another mode: its own defaults, shown and used
    assert widget.settings.lr.value() == pytest.approx(full.lr)
    request = widget._request()
    assert request.settings.trainable == "all" and request.settings.lr == pytest.approx(full.lr)
    assert widget.settings.val_fraction.isEnabled()  # a full run holds pairs back

    widget.settings.lr.setValue(0.005)  # typed by the user: kept whatever the mode, and used
    _select(widget, "group_local")
    assert widget.settings.lr.value() == pytest.approx(0.005)
    assert widget._request().settings.lr == pytest.approx(0.005)
