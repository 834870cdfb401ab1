"""Routing inspector on a real viewer, plus the Qt-free parts behind the widgets: sweep maths, model registry,
result layer building."""
from __future__ import annotations

import json

import numpy as np
import pytest

from test_widget_segment import RACES, dock, make_image, results, run_and_wait


# -- sweep maths (no Qt) -------------------------------------------------------------------------------------
def test_pairwise_agreement_by_hand():
    from napari_dmoe.inference.sweep import pairwise_agreement

    a = np.array([[0, 1, 1, 2], [0, 0, 2, 2]])
    b = np.array([[0, 1, 0, 2], [0, 0, 2, 0]])
    c = np.zeros_like(a)
    t = pairwise_agreement({"A": a, "B": b, "C": c}, n_classes=3)
    # class 1: |a|=2, |b|=1, both 1 -> 2/3 ; class 2: |a|=3, |b|=2, both 2 -> 4/5
    assert t.class_dice[0, 1].tolist() == pytest.approx([2 / 3, 4 / 5])
    assert t.dice[0, 1] == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert t.changed[0, 1] == 2 and t.changed[1, 0] == 2
    assert t.dice[0, 2] == 0.0 and t.changed[0, 2] == 5  # all foreground lost
    assert t.dice[2, 2] == 1.0 and np.isnan(t.class_dice[2, 2]).all()  # two empty masks agree
    rows = t.pairs()
    assert [(r[0], r[1]) for r in rows] == [("A", "B"), ("A", "C"), ("B", "C")]
    assert rows[0][4] == pytest.approx(100 * 2 / 8)


def test_pairwise_dice_agrees_with_monai():
    import torch
    from monai.metrics import compute_dice
    from monai.networks.utils import one_hot

    from napari_dmoe.inference.sweep import pairwise_agreement

    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 3, (2, 16, 16, 8))
    t = pairwise_agreement({"a": a, "b": b}, n_classes=3)
    oh = [one_hot(torch.from_numpy(m)[None, None], num_classes=3) for m in (a, b)]
    ref = compute_dice(oh[0], oh[1], include_background=False)[0].numpy()
    np.testing.assert_allclose(t.class_dice[0, 1], ref, rtol=1e-6)


def test_pairwise_agreement_rejects_bad_input():
    from napari_dmoe.inference.sweep import SweepError, pairwise_agreement

    with pytest.raises(SweepError, match="at least two"):
        pairwise_agreement({"a": np.zeros((2, 2), int)})
    with pytest.raises(SweepError, match="shape"):
        pairwise_agreement({"a": np.zeros((2, 2), int), "b": np.zeros((3, 2), int)})
    with pytest.raises(SweepError, match="integers"):
        pairwise_agreement({"a": np.zeros((2, 2)), "b": np.zeros((2, 2))})


def test_expert_usage_and_matrix():
    from napari_dmoe.inference.sweep import SweepError, expert_usage, usage_matrix

    maps = np.zeros((3, 2, 2), np.float16)
    maps[0, 0] = 1.0
    maps[2, 1] = 1.0
    assert expert_usage(maps) == pytest.approx([0.5, 0.0, 0.5])
    labels, m = usage_matrix([("x", {"mean": [0.5, 0.5]}), ("y", {"block0": [1, 0]}), ("z", {"mean": [0, 1]})])
    assert labels == ["x", "z"] and m.tolist() == [[0.5, 0.5], [0.0, 1.0]]
    assert usage_matrix([], "mean")[1].shape == (0, 0)
    with pytest.raises(SweepError, match="experts"):
        usage_matrix([("x", {"mean": [1, 0]}), ("y", {"mean": [1, 0, 0]})])


# -- model registry (no Qt) ----------------------------------------------------------------------------------
def test_registry_recent_models(tmp_path, monkeypatch):
    from napari_dmoe.io import model_list as reg

    monkeypatch.setattr(reg, "bundled_dir", lambda: tmp_path / "bundled")
    (tmp_path / "bundled").mkdir()
    (tmp_path / "bundled" / "demo.safetensors").write_bytes(b"x")
    files = []
    for i in range(4):
        f = tmp_path / f"m{i}.safetensors"
        f.write_bytes(b"x")
        files.append(f)
    for f in files:
        reg.add_recent(f, limit=3)
    reg.add_recent(files[1], limit=3)  # used again: moves to the top, no duplicate
    assert [e.path for e in reg.recent_models()] == [files[1], files[3], files[2]]
    files[3].unlink()  # deleted files drop out of the list
    entries = reg.list_models()
    assert [(e.source, e.name) for e in entries] == [("bundled", "demo"), ("recent", "m1"), ("recent", "m2")]
    assert entries[0].label == "demo: demo"
    saved = json.loads((tmp_path / "config" / reg.RECENT_FILE).read_text())
    assert saved["recent"][0] == str(files[1])
    with pytest.raises(reg.RegistryError, match="end in .safetensors"):
        reg.add_recent(tmp_path / "model.pth")
    with pytest.raises(reg.RegistryError, match="not found"):
        reg.add_recent(tmp_path / "missing.safetensors")
    (tmp_path / "config" / reg.RECENT_FILE).write_text("{not json")
    assert reg.recent_models() == []  # a corrupt cache is ignored, not fatal


# -- result layers (no Qt) -----------------------------------------------------------------------------------
def test_result_layers_for_a_slice_by_slice_volume(model_path):
    from napari_dmoe.io.checkpoint import load_model
    from napari_dmoe.inference.engine import segment
    from napari_dmoe.plugin.results import SourceInfo, result_layers

    model = load_model(model_path)
    volume = np.stack([make_image((24, 24))] * 3)
    seg = segment(model, volume, "White", device="cpu")
    source = SourceInfo("vol", (3.0, 0.5, 0.5), (1.0, 2.0, 3.0), {"spacing": [3.0, 0.5, 0.5]})
    (mask, kw_mask, t_mask), (heat, kw_heat, t_heat), (dom, kw_dom, t_dom) = result_layers(
        seg, model.spec, str(model_path), source, {"race": "White"}, position="block1")
    assert (t_mask, t_heat, t_dom) == ("labels", "image", "labels")
    assert kw_mask["name"] == "mask [race=White; tiny] vol" and mask.shape == (3, 24, 24)
    assert heat.shape == (4, 3, 24, 24) and kw_heat["scale"] == (1.0, 3.0, 0.5, 0.5)
    assert kw_heat["translate"] == (0.0, 1.0, 2.0, 3.0)
    np.testing.assert_array_equal(heat, seg.routing["block1"])
    np.testing.assert_array_equal(dom, np.argmax(seg.routing["block1"], axis=0) + 1)
    assert kw_mask["metadata"]["spacing"] == [3.0, 0.5, 0.5]  # source geometry kept for the writer
    json.dumps(kw_mask["metadata"]["dmoe"])  # provenance is plain JSON
    # a position this model does not have falls back to the mean, and says so
    layers = result_layers(seg, model.spec, str(model_path), source, {"race": "White"}, position="block9")
    assert layers[0][1]["metadata"]["dmoe"]["routing_position"] == "mean"
    assert any("block9" in w for w in layers[0][1]["metadata"]["dmoe"]["warnings"])


# -- the dock widget -----------------------------------------------------------------------------------------
def test_inspector_draws_attribute_by_expert_matrix(make_napari_viewer, qtbot, model_path):
    viewer = make_napari_viewer()
    viewer.add_image(make_image(), name="scan")
    _, inspector = viewer.window.add_plugin_dock_widget("napari-dmoe", "Routing inspector")
    assert inspector.matrix()[0] == [] and "No dMoE results" in inspector.hint.text()

    widget = dock(viewer, model_path)
    run_and_wait(qtbot, widget, button=widget.sweep_button)
    masks = {m.metadata["dmoe"]["tag"]: m for m in results(viewer)}
    assert inspector.groups.currentText() == "scan | tiny.safetensors"
    assert [inspector.positions.itemText(i) for i in range(inspector.positions.count())] == \
        ["mean", "block0", "block1"]
    labels, matrix = inspector.matrix()
    assert labels == [f"race={r}" for r in RACES] and matrix.shape == (3, 4)
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-2)  # gate weights sum to 1 per pixel
    for label, row in zip(labels, matrix):
        np.testing.assert_allclose(row, masks[label].metadata["dmoe"]["expert_usage"]["mean"])
    assert not np.allclose(matrix[0], matrix[1])  # different routers use the experts differently

    image = inspector.figure.axes[0].images[0]
    np.testing.assert_allclose(np.asarray(image.get_array()), matrix)
    assert [t.get_text() for t in inspector.figure.axes[0].get_yticklabels()] == labels

    inspector.positions.setCurrentText("block0")
    _, block0 = inspector.matrix()
    assert not np.allclose(block0, matrix)
    np.testing.assert_allclose(np.asarray(inspector.figure.axes[0].images[0].get_array()), block0)

    viewer.layers.remove(masks["race=Asian"])
    assert inspector.matrix()[0] == ["race=Black", "race=White"]  # follows the layer list
