"""The Segment widget's "run on: a server" option against a real `dmoe serve` subprocess (xvfb, real viewer)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

if importlib.util.find_spec("napari") is None:  # a core-only install; find_spec does not import napari
    pytest.skip("napari is not installed", allow_module_level=True)

from inference_models import make_image  # noqa: E402
from test_server import TOKEN, running_server  # noqa: E402

pytestmark = [pytest.mark.gui, pytest.mark.slow]
SKIN = Path(__file__).resolve().parent.parent / "napari_dmoe" / "assets" / "models" / "skin-dmoe.safetensors"


def test_segment_through_a_server_equals_the_local_engine(make_napari_viewer, qtbot, model_path, tmp_path):
    from napari_dmoe.inference.engine import segment
    from napari_dmoe.io.checkpoint import load_model

    viewer = make_napari_viewer()
    image = viewer.add_image(make_image(), name="scan", scale=(0.5, 2.0), translate=(3.0, -4.0))
    _, widget = viewer.window.add_plugin_dock_widget("napari-dmoe", "Segment (dMoE)")
    widget.models.set_path(SKIN)  # the local picker's model, not the one that runs on the server
    with running_server([model_path], tmp_path / "server.log") as server:
        remote = widget.remote
        remote.where.setCurrentIndex(remote.where.findText("a server"))
        remote.url.setText(server.url)
        remote.token.setText("wrong")
        assert not remote.connect_server() and "401" in remote.info.text()  # the server's refusal, shown
        assert widget.spec is None and not widget.run_button.isEnabled()  # no server model: nothing to run
        assert not widget.models.isEnabled()  # the local model picker is not what runs
        remote.token.setText(TOKEN)
        assert remote.connect_server()
        viewer.add_image(np.stack([make_image()] * 3), name="stack")  # a volume for a 2D model: the banner
        banner = widget.fit_banner
        assert f"does not fit the model '{remote.model.currentText()}'" in banner.text() and "skin" not in banner.text()
        widget.images.setCurrentText("scan")
        assert widget.spec is not None and widget.spec.class_names == ["background", "rim", "cup"]
        assert [widget.attributes.combos["race"].itemText(i) for i in range(3)] == ["Asian", "Black", "White"]
        widget.attributes.set_value("race", "Black")
        worker = widget.segment()
        assert worker is not None
        qtbot.waitUntil(lambda: widget.worker is None, timeout=120000)
    masks = [layer for layer in viewer.layers if layer.metadata.get("dmoe", {}).get("kind") == "mask"]
    assert len(masks) == 1, widget.status.text()
    mask = masks[0]
    expected = segment(load_model(model_path), image.data, "Black", spacing=(0.5, 2.0), routing=False)
    np.testing.assert_array_equal(mask.data, expected.labels)
    np.testing.assert_allclose(mask.scale, image.scale)
    prov = mask.metadata["dmoe"]
    assert prov["model"].startswith(server.url) and prov["attribute_used"] == {"race": "Black"}
    remote.where.setCurrentIndex(remote.where.findText("this computer"))
    assert remote.job(None, []) is None and widget.models.isEnabled()  # back to the local engine
