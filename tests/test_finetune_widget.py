"""Fine-tune widget on a real viewer (xvfb) running the real ``dmoe train`` in a subprocess on a tiny model."""
from __future__ import annotations

import importlib.util

import json
import os
import time

import sys
from pathlib import Path

import numpy as np
import pytest

if importlib.util.find_spec("napari") is None:  # a core-only install; find_spec does not import napari
    pytest.skip("napari is not installed", allow_module_level=True)
pytestmark = [pytest.mark.gui, pytest.mark.slow]  # each runs real `dmoe train` subprocesses (~1 min)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # bench/stall_meter.py

RACES = ["Asian", "Black", "White"]
TRAIN_TIMEOUT_MS = 240_000  # the machine is shared; a tiny run takes ~20 s alone


@pytest.fixture
def base_model(tmp_path):
    import torch

    from napari_dmoe.io.checkpoint import save_model
    from napari_dmoe.model import build_network, make_spec

    torch.manual_seed(0)
    spec = make_spec("transunet2d-tiny", "race", RACES, ["background", "disc"], n_experts=4)
    return save_model(tmp_path / "base.safetensors", build_network(spec), spec)


def add_cases(viewer, n: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        labels = np.zeros((64, 64), np.int32)
        labels[16 + i:44, 20:48 - i] = 1
        image = rng.normal(0, 1, (64, 64)).astype(np.float32) + 2 * labels
        viewer.add_image(image, name=f"scan{i}", metadata={"dmoe_attributes": {"race": RACES[i % 3]}})
        viewer.add_labels(labels, name=f"scan{i} truth")


def make_widget(viewer, base_model, tmp_path, **kwargs):
    from napari_dmoe.plugin.widgets.finetune_widget import FinetuneWidget

    widget = FinetuneWidget(viewer, **kwargs)
    widget.models.set_path(base_model)
    widget.output.setText(str(tmp_path / "runs"))
    widget.devices.combo.setCurrentIndex(widget.devices.combo.findData("cpu"))
    return widget


def fill_pairs(widget, n: int) -> None:
    for i in range(n):
        widget.viewer.layers.selection.active = widget.viewer.layers[f"scan{i}"]
        widget.add_pair(labels=f"scan{i} truth")


def tensors(path):
    from safetensors.numpy import load_file

    return load_file(str(path))


def test_finetune_on_layers_end_to_end(make_napari_viewer, qtbot, base_model, tmp_path):
    from stall_meter import StallMeter  # bench/, put on the path above
    from napari_dmoe.plugin.widgets.segment_widget import SegmentWidget
    from napari_dmoe.io.checkpoint import load_model
    from napari_dmoe.io.model_list import recent_models

    viewer = make_napari_viewer()
    add_cases(viewer, 3)
    segment = SegmentWidget(viewer)
    segment.models.set_path(base_model)
    widget = make_widget(viewer, base_model, tmp_path, segment_widget=segment)
    fill_pairs(widget, 3)
    assert widget.pairs.rows()[1] == ("scan1", "scan1 truth", {"race": "Black"}, False)  # attribute from metadata

    # correct-and-learn: segment scan0, correct the mask, add it with one click
    segment.images.setCurrentText("scan0")
    segment.attributes.set_value("race", "Asian")
    segment.segment()
    qtbot.waitUntil(lambda: segment.worker is None, timeout=60_000)
    mask = next(l for l in viewer.layers if l.metadata.get("dmoe", {}).get("kind") == "mask")
    mask.data = viewer.layers["scan0 truth"].data.copy()  # the user's correction
    viewer.layers.selection.active = mask
    row = widget.add_current_result()
    assert widget.pairs.rows()[row] == ("scan0", mask.name, {"race": "Asian"}, False)
    widget.pairs.set_validation(1, True)  # hold back scan1 (a chosen validation case)

    widget.settings.steps.setValue(3)
    widget.settings.batch.setValue(2)
    widget.settings.keep_base.setChecked(False)  # a random base and a few steps both score 0: compare anyway
    meter = StallMeter()
    process = widget.start()
    assert process is not None and widget.run_button.text() == "Cancel"
    meter.start()
    qtbot.waitUntil(lambda: widget.phase != "train", timeout=TRAIN_TIMEOUT_MS)
    meter.stop()
    qtbot.waitUntil(lambda: widget.process is None, timeout=TRAIN_TIMEOUT_MS)
    print(f"longest event-loop stall while training: {meter.longest_stall_ms:.1f} ms over {len(meter.gaps)} ticks")

    assert widget.errors.isHidden(), widget.errors.toPlainText()
    assert widget.new_model is not None and widget.new_model.is_file(), widget.status.text()
    assert process.state.step == 3 and process.state.losses and process.state.val  # events were followed
    assert widget.plot.draws >= 1
    new = load_model(widget.new_model)
    before, after = tensors(base_model), tensors(widget.new_model)
    assert set(before) == set(after)
    assert any(not np.array_equal(before[k], after[k]) for k in before)  # the weights changed
    finetune = new.spec.provenance["finetune"]
    assert finetune["base_model"] == base_model.name
    assert finetune["data"]["n_val"] == 1 and finetune["data"]["counts"]["race"] == {"Asian": 2, "Black": 1, "White": 1}
    # the model can be shared: no case (layer) names and no local paths in its header; they stay in the run folder
    header = json.dumps(new.spec.to_dict())
    assert "scan1" not in header and str(widget.run_dir) not in header and str(tmp_path) not in header
    local = json.loads((widget.run_dir / "provenance.json").read_text())
    assert local["data"]["val"] == ["scan1"]
    assert finetune["settings"]["steps"] == 3
    rows = {r[0].split(" ")[0]: r for r in widget.compare.values()}  # every group, "(corrected)" marked
    unknown = rows.pop("unknown")  # the attribute unknown averages every group: shown how much its masks moved
    assert sorted(rows) == RACES and all(len(r) == 7 and "(corrected)" in r[0] for r in rows.values())
    assert "averages all 3 groups" in unknown[1]
    assert float(rows["Black"][3]) == pytest.approx(new.spec.metrics["finetune_validation_dice"]["after"]["Black"],
                                                    abs=1e-3)
    assert widget.new_model in [e.path for e in recent_models()]  # registered for the Segment widget
    assert segment.models.combo.findData(str(widget.new_model)) >= 0
    assert meter.longest_stall_ms < 2000  # the goal (100 ms) is reported in BENCHMARKS.md; this catches freezes

    # re-run segmentation on the current image with the new model at once
    segment.images.setCurrentText("scan2")
    widget.segment_button.click()
    qtbot.waitUntil(lambda: segment.worker is None, timeout=60_000)
    masks = [l for l in viewer.layers if l.metadata.get("dmoe", {}).get("model") == str(widget.new_model)]
    assert masks and masks[0].metadata["dmoe"]["source_layer"] == "scan2"


def test_cancel_keeps_last_checkpoint_and_stops_process(make_napari_viewer, qtbot, base_model, tmp_path):
    from napari_dmoe.io.checkpoint import load_model

    answers = []
    viewer = make_napari_viewer()
    add_cases(viewer, 3)
    widget = make_widget(viewer, base_model, tmp_path, confirm=lambda parent, q: answers.pop(0))
    fill_pairs(widget, 3)
    widget.settings.steps.setValue(400)  # validation + checkpoint every 80 steps
    widget.settings.batch.setValue(1)
    widget.settings.keep_base.setChecked(False)  # else the validated base is the first checkpoint (step 0)
    process = widget.start()
    last = tmp_path / "runs"
    qtbot.waitUntil(lambda: any(process.state.checkpoints), timeout=TRAIN_TIMEOUT_MS)
    answers.append(False)
    assert widget.cancel() is False and process.running()  # "No" keeps it running
    answers.append(True)
    widget.run_button.click()  # Cancel
    qtbot.waitUntil(lambda: widget.process is None, timeout=30_000)
    assert process.returncode is not None and process.returncode != 0
    with pytest.raises(ProcessLookupError):
        os.kill(process.pid, 0)  # gone (and reaped)
    assert process.state.step < 400
    assert widget.last_checkpoint is not None and widget.last_checkpoint.parent.parent.parent == last
    model = load_model(widget.last_checkpoint)  # the last good checkpoint still loads
    assert model.spec.provenance["step"] >= 80
    assert widget.status.text().startswith("Cancelled") and str(widget.last_checkpoint) in widget.status.text()
    assert widget.new_model is None and widget.run_button.text() == "Start fine-tune"


def test_a_run_that_beats_nothing_offers_no_new_model(make_napari_viewer, qtbot, base_model, tmp_path):
    """The default (group-local): cross-validation over both pairs scores the base too; a random base and 1-2 steps
    all score 0 on the held-out pair, so the base is kept, no model is made or registered, and the status says so."""
    from napari_dmoe.io.model_list import recent_models

    viewer = make_napari_viewer()
    add_cases(viewer, 2)
    widget = make_widget(viewer, base_model, tmp_path)
    fill_pairs(widget, 2)
    assert widget.settings.keep_base.isChecked()
    widget.settings.steps.setValue(2)
    widget.settings.batch.setValue(1)
    process = widget.start()
    assert process is not None, widget.status.text()
    qtbot.waitUntil(lambda: widget.process is None, timeout=TRAIN_TIMEOUT_MS)
    assert widget.errors.isHidden(), widget.errors.toPlainText()
    selection = process.state.selection
    assert selection["kept_base"] and selection["cases"] == 2 and process.state.best_step == 0
    assert widget.new_model is None and not list(widget.run_dir.glob("*-finetuned-*.safetensors"))
    assert not any("finetuned" in str(e.path) for e in recent_models())
    assert widget.status.text().startswith("Cross-validation on your 2 corrected pairs")
    assert "base model is kept" in widget.status.text() and widget.run_button.text() == "Start fine-tune"


def test_failing_subprocess_shows_readable_message(make_napari_viewer, qtbot, base_model, tmp_path):
    viewer = make_napari_viewer()
    add_cases(viewer, 2)
    widget = make_widget(viewer, base_model, tmp_path)
    fill_pairs(widget, 2)
    widget.settings.steps.setValue(2)
    base_model.write_bytes(b"this is not a model")  # corrupted after it was picked
    started = time.monotonic()
    assert widget.start() is not None
    qtbot.waitUntil(lambda: widget.process is None, timeout=TRAIN_TIMEOUT_MS)
    text = widget.errors.toPlainText()
    assert not widget.errors.isHidden() and widget.new_model is None
    assert "Fine-tune failed" in text and "base.safetensors" in text and "Traceback" not in text.split("---")[0]
    assert "dmoe train: error" in text  # the last stderr lines of the engine are shown too
    assert widget.status.text().startswith("Fine-tune failed") and time.monotonic() - started < 240


def test_bad_input_is_refused_before_starting(make_napari_viewer, base_model, tmp_path):
    viewer = make_napari_viewer()
    add_cases(viewer, 2)
    widget = make_widget(viewer, base_model, tmp_path)
    widget.add_pair(image="scan0", labels="scan0 truth")
    assert widget.start() is None and "at least two pairs" in widget.status.text()
    widget.add_pair(image="scan1", labels="scan0 truth")
    viewer.layers["scan0 truth"].data = np.full((64, 64), 5, np.int32)  # class 5 in a 2-class model
    assert widget.start() is None and "relabel" in widget.status.text()
    viewer.layers.selection.active = viewer.layers["scan0"]
    assert widget.add_current_result() is None  # an image is not a Segment result
    assert widget.process is None and not list((tmp_path / "runs").rglob("*.yaml"))  # nothing was started


def test_3d_finetune_through_the_widget(make_napari_viewer, qtbot, model3d, tmp_path):
    """A 3D base model, two 64^3 volumes (one held back), a real 2-step ``dmoe train`` and comparison."""
    from napari_dmoe import load_model
    from napari_dmoe.io.checkpoint import save_model

    base = save_model(tmp_path / "base3d.safetensors", model3d.network, model3d.spec)
    viewer = make_napari_viewer()
    rng = np.random.default_rng(3)
    for i in range(2):  # 64^3: the smallest volume the 3D UNet takes (multiples of 32, >= 64 per axis)
        labels = np.zeros((64, 64, 64), np.int32)
        labels[16:48, 18 + i:46, 20:44] = 1
        labels[28:36, 28:36, 28:36] = 2  # a "cup" inside the "rim": both classes present
        image = rng.normal(0, 1, labels.shape).astype(np.float32) + labels
        viewer.add_image(image, name=f"vol{i}", metadata={"dmoe_attributes": {"race": RACES[i]}})
        viewer.add_labels(labels, name=f"vol{i} truth")
    widget = make_widget(viewer, base, tmp_path)
    assert widget.spec.spatial_dims == 3 and widget.settings.patch.text() == "64,64,64"
    widget.add_pair(image="vol0", labels="vol0 truth")
    widget.add_pair(image="vol1", labels="vol1 truth", validation=True)
    widget.settings.steps.setValue(2)
    widget.settings.batch.setValue(1)
    widget.settings.lr.setValue(0.01)
    widget.settings.keep_base.setChecked(False)  # a random base and a few steps both score 0: compare anyway
    process = widget.start()
    assert process is not None, widget.status.text()
    qtbot.waitUntil(lambda: widget.process is None, timeout=TRAIN_TIMEOUT_MS)

    assert widget.errors.isHidden(), widget.errors.toPlainText()
    assert widget.new_model is not None and widget.new_model.is_file(), widget.status.text()
    state = process.state  # cross-validation's and the final fit's events were followed
    assert state.selection and state.selection["steps"] in (1, 2) and state.step == state.total_steps
    new = load_model(widget.new_model)
    assert new.spec.spatial_dims == 3 and new.spec.arch == "resunet3d" and list(new.spec.input_size) == [64, 64, 64]
    assert any(p.ndim == 5 for p in new.network.parameters())  # 3D convolutions
    # White has no corrected case: the default is group-local, cross-validated on both volumes, then trained on both
    before, after = tensors(base), tensors(widget.new_model)
    assert set(after) - set(before) and all(".local_experts." in k for k in set(after) - set(before))
    changed = [k for k in before if not np.array_equal(before[k], after[k])]
    assert changed and all(".routers.0." in k or ".routers.1." in k for k in changed)  # Asian's, Black's routers
    assert new.spec.provenance["adaptation"]["groups"] == ["Asian", "Black"]
    finetune = new.spec.provenance["finetune"]
    assert finetune["data"]["n_train"] == 1 and finetune["data"]["n_val"] == 1
    header = json.dumps(new.spec.to_dict())
    assert "vol0" not in header and str(tmp_path) not in header  # shareable: no case names, no local paths
    assert finetune["settings"]["patch_size"] == [64, 64, 64]
    rows = widget.compare.values()
    assert [r[0] for r in rows] == ["Asian (corrected)", "Black (corrected)", "White", "unknown"]
    assert "cross-validation" in rows[1][1]  # the corrected groups: the estimate on the user's own cases
    assert rows[2][5].startswith("1.000") and rows[2][6] == "ok"  # White's masks: exactly the base model's
    dice_after = new.spec.metrics["finetune_validation_dice"]["after"]
    assert float(rows[1][3]) == pytest.approx(dice_after["Black"], abs=1e-3) and 0 <= dice_after["Black"] <= 1
    assert widget.status.text().startswith("Done") and widget.segment_button.isEnabled()
