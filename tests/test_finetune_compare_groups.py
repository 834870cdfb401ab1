"""The before/after lists every group, flags a group that got worse (or whose masks moved without labels), and
the Fine-tune widget asks before registering such a model (real viewer, real subprocesses, QMessageBox answered)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_dmoe.evaluation.loop import Case
from napari_dmoe.finetune.compare import group_rows
from napari_dmoe.finetune.prepare import default_trainable, uncorrected_groups

from inference_models import RACES, TinyModel, make_image, tiny


def _case(group: str, i: int, label=None) -> Case:
    image = np.roll(make_image((64, 64)), 5 * i, axis=1)
    return Case(f"{group}{i}", group, image, label if label is not None else np.zeros((64, 64), np.uint8),
                {"race": group})


def test_rows_cover_every_group_and_flag_the_ones_that_got_worse():
    base = tiny("transunet2d-tiny")
    with torch.no_grad():  # a "fine-tune" that broke the shared decoder: every group changes
        broken = TinyModel(base.spec, tiny("transunet2d-tiny").network)
        for name, p in broken.network.named_parameters():
            if "decoder" in name or "segmentation_head" in name:
                p.add_(torch.randn_like(p))
    truth = [_case("Black", i) for i in range(2)]
    from napari_dmoe.inference.engine import segment

    for c in truth:  # labels = the base model's masks: the base is perfect on them, any change is worse
        c.label = segment(base, c.image, "Black", routing=False).labels.astype(np.uint8)
    reference = [_case("White", 7)]  # labelled like a demo reference set: its label is the base's mask too
    reference[0].label = segment(base, reference[0].image, "White", routing=False).labels.astype(np.uint8)
    rows = group_rows(base, broken, val=truth, pairs=truth, reference=reference)
    by = {r["group"]: r for r in rows}
    assert [r["group"] for r in rows] == [*RACES, "unknown"]  # every group, corrected or not, and "unknown"
    # "unknown" averages every group's answer: it moves with them (shown, not flagged: no group of its own)
    assert by_unknown(rows)["agreement"] < 0.99 and by_unknown(rows)["flag"] is None
    assert by["Black"]["corrected"] and by["Black"]["source"] == "held-back pairs" and by["Black"]["n"] == 2
    assert by["Black"]["before"] == pytest.approx(1.0) and by["Black"]["flag"] == "worse"
    assert by["White"]["source"] == "reference set" and by["White"]["flag"] == "worse"
    assert by["Asian"]["source"] == "no labels" and by["Asian"]["before"] is None
    assert by["Asian"]["agreement_n"] == 2 and by["Asian"]["agreement"] < 0.99 and by["Asian"]["flag"] == "changed"

    same = group_rows(base, base, val=truth, pairs=truth, reference=reference)
    assert all(r["flag"] is None for r in same)
    assert {r["group"]: r.get("agreement") for r in same} == {"Asian": 1.0, "Black": None, "White": 1.0,
                                                              "unknown": 1.0}


def by_unknown(rows):
    return next(r for r in rows if r["group"] == "unknown")


def test_default_mode_is_group_local_unless_every_group_is_corrected():
    spec = tiny("transunet2d-tiny").spec
    assert default_trainable(spec, [{"race": "Black"}, {"race": "Black"}]) == "group_local"
    assert uncorrected_groups(spec, [{"race": "Black"}]) == ["Asian", "White"]
    assert default_trainable(spec, [{"race": g} for g in RACES]) == "all"
    assert default_trainable(tiny("transunet2d-tiny", routing="none").spec, [{"race": "Black"}]) == "all"


def test_bundled_reference_sets_are_small_and_cover_every_group():
    from napari_dmoe.finetune.reference_sets import reference_cases
    from napari_dmoe.io.model_list import bundled_dir

    cases = reference_cases(bundled_dir() / "fundus-dmoe.safetensors")
    assert sorted({c.group for c in cases}) == RACES and len(cases) == 12
    assert all(c.image.shape == (224, 224) and c.label.max() == 2 for c in cases)
    again = reference_cases(bundled_dir() / "fundus-dmoe.safetensors")
    assert all(np.array_equal(a.image, b.image) for a, b in zip(cases, again))  # deterministic
    assert reference_cases("elsewhere/fundus-dmoe.safetensors") == []  # only the bundled file has one


# -- the widget ------------------------------------------------------------------------------------------------
@pytest.mark.gui
@pytest.mark.slow
def test_widget_defaults_to_group_local_and_asks_before_registering_a_worse_model(
        make_napari_viewer, qtbot, tmp_path, monkeypatch):
    pytest.importorskip("napari")
    from qtpy.QtWidgets import QMessageBox

    from napari_dmoe.io.checkpoint import load_model, save_model
    from napari_dmoe.io.model_list import recent_models
    from napari_dmoe.plugin.widgets.finetune_widget import FinetuneWidget

    torch.manual_seed(0)
    base = tiny("transunet2d-tiny")
    base_path = save_model(tmp_path / "base.safetensors", base.network, base.spec)
    viewer = make_napari_viewer()
    rng = np.random.default_rng(0)
    for i in range(3):  # three corrected cases, all of the Black group
        labels = np.zeros((64, 64), np.int32)
        labels[16 + i:44, 20:48 - i] = 1
        labels[26:34, 28:36] = 2
        viewer.add_image(rng.normal(0, 1, (64, 64)).astype(np.float32) + labels, name=f"scan{i}",
                         metadata={"dmoe_attributes": {"race": "Black"}})
        viewer.add_labels(labels, name=f"scan{i} truth")
    widget = FinetuneWidget(viewer)
    widget.models.set_path(base_path)
    widget.output.setText(str(tmp_path / "runs"))
    widget.devices.combo.setCurrentIndex(widget.devices.combo.findData("cpu"))
    for i in range(3):
        widget.add_pair(image=f"scan{i}", labels=f"scan{i} truth", validation=i == 2)
    widget.settings.steps.setValue(3)
    widget.settings.batch.setValue(2)
    widget.settings.lr.setValue(0.05)
    widget.settings.keep_base.setChecked(False)  # a random base and a few steps both score 0: compare anyway
    asked: list[str] = []

    def answer(reply):
        def question(parent, title, text, *args, **kwargs):
            asked.append(text)
            return reply
        return question

    # 1. automatic -> group-local: nothing to ask, Asian and White stay bitwise, the model is registered
    monkeypatch.setattr(QMessageBox, "question", answer(QMessageBox.No))
    assert widget.start() is not None, widget.status.text()
    qtbot.waitUntil(lambda: widget.process is None, timeout=300_000)
    assert widget.errors.isHidden(), widget.errors.toPlainText()
    assert not asked and widget.new_model in [e.path for e in recent_models()]
    rows = widget.compare.values()
    assert [r[0] for r in rows] == ["Asian", "Black (corrected)", "White", "unknown"]
    assert "cross-validation" in rows[1][1]  # the corrected group: an estimate on the user's own cases
    assert rows[0][5].startswith("1.000") and rows[2][5].startswith("1.000")  # masks agree exactly
    assert rows[0][6] == rows[2][6] == "ok"
    tuned = load_model(widget.new_model)
    assert tuned.spec.provenance["adaptation"]["mode"] == "group_local"
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        for g in (0, 2):
            assert torch.equal(tuned.network(x, torch.tensor([g, g])), base.network(x, torch.tensor([g, g])))

    # 2. all weights with groups uncorrected: asked before training (yes), then before registering (no)
    widget.settings.trainable.setCurrentIndex(3)
    monkeypatch.setattr(QMessageBox, "question", answer(QMessageBox.Yes))
    widget.settings.lr.setValue(0.5)
    process = widget.start()
    assert process is not None and "Asian, White" in asked[-1]
    monkeypatch.setattr(QMessageBox, "question", answer(QMessageBox.No))
    qtbot.waitUntil(lambda: widget.process is None, timeout=300_000)
    assert widget.errors.isHidden(), widget.errors.toPlainText()
    flagged = [r for r in widget.compare.values() if r[6] != "ok"]
    assert flagged and "Add it to the model lists anyway" in asked[-1]
    assert widget.new_model.is_file() and widget.new_model not in [e.path for e in recent_models()]
    assert "NOT added" in widget.status.text() and not widget.segment_button.isEnabled()


def test_dmoe_info_prints_the_per_group_comparison():
    from napari_dmoe.cli.info import format_spec

    spec = tiny("transunet2d-tiny").spec
    spec.local_experts = [[[1, 3]]]
    spec.metrics = {"finetune_groups": [
        {"group": "Asian", "corrected": False, "source": "reference set", "n": 4, "before": 0.86, "after": 0.86,
         "agreement": 1.0, "flag": None},
        {"group": "Black", "corrected": True, "source": "held-back pairs", "n": 2, "before": 0.78, "after": 0.90,
         "flag": None},
        {"group": "White", "corrected": False, "source": "no labels", "n": 0, "before": None, "after": None,
         "agreement": 0.7, "flag": "changed"}]}
    text = format_spec(spec)
    assert "1 local expert(s)" in text
    assert "Black: Dice 0.780 -> 0.900 (held-back pairs, n=2) (corrected)" in text
    assert "White: no labels, masks agree 0.700 [CHANGED]" in text


@pytest.mark.gui
@pytest.mark.slow
def test_untouched_lr_follows_the_resolved_mode(make_napari_viewer, tmp_path, monkeypatch):
    """Left as is, the form shows the lr of the mode that will run (issue 23 item 5): group-local's own default
    when the pairs leave groups uncorrected, the full fine-tune's when "all" is chosen; the user's lr is kept."""
    pytest.importorskip("napari")
    from qtpy.QtWidgets import QMessageBox

    from napari_dmoe.finetune.prepare import default_settings
    from napari_dmoe.io.checkpoint import save_model
    from napari_dmoe.plugin.widgets.finetune_widget import FinetuneWidget

    base = tiny("transunet2d-tiny")
    viewer = make_napari_viewer()
    for i in range(2):
        viewer.add_image(make_image((64, 64)), name=f"scan{i}", metadata={"dmoe_attributes": {"race": "Black"}})
        viewer.add_labels(np.ones((64, 64), np.int32), name=f"scan{i} truth")
    widget = FinetuneWidget(viewer)
    widget.models.set_path(save_model(tmp_path / "base.safetensors", base.network, base.spec))
    widget.devices.combo.setCurrentIndex(widget.devices.combo.findData("cpu"))
    for i in range(2):
        widget.add_pair(image=f"scan{i}", labels=f"scan{i} truth", validation=i == 1)
    full, local = default_settings("cpu", None), default_settings("cpu", None, trainable="group_local")
    assert widget.settings.lr.value() == pytest.approx(local.lr)
    auto = widget._request().settings
    assert (auto.trainable, auto.lr, auto.local_experts) == ("group_local", local.lr, local.local_experts)
    widget.settings.trainable.setCurrentIndex(3)  # all weights: keeps the shown lr (asked first: yes)
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: QMessageBox.Yes)
    assert (widget._request().settings.trainable, widget._request().settings.lr) == ("all", pytest.approx(full.lr))
    widget.settings.trainable.setCurrentIndex(0)
    widget.settings.lr.setValue(0.03)  # the user's own lr is kept
    assert widget._request().settings.lr == pytest.approx(0.03)
