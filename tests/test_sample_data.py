"""napari File > Open Sample: the plugin's samples load in a real viewer with scale, metadata and labels."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.gui


def test_fundus_sample_in_viewer(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-dmoe", "fundus")
    image, labels = viewer.layers
    assert image._type_string == "image" and labels._type_string == "labels"
    assert image.data.shape == (224, 224) and image.data.dtype == np.uint8
    assert image.metadata["dmoe_attributes"] == {"race": "Black"}
    assert set(np.unique(labels.data)) == {0, 1, 2}
    assert np.allclose(image.scale, (1, 1))


def test_prostate_sample_in_viewer(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-dmoe", "prostate")
    image, labels = viewer.layers
    assert image.data.ndim == 3 and image.data.shape == labels.data.shape
    assert np.allclose(image.scale, (3.0, 2.0, 2.0)) and np.allclose(labels.scale, image.scale)  # z, y, x in mm
    assert image.metadata["dmoe_attributes"] == {"stage": "T3"}
    assert labels.data.max() == 1 and labels.data.sum() > 100
    assert image.data.min() < -900 and image.data.max() > 300  # HU: air and bone


def test_skin_and_real_retina_samples(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-dmoe", "skin")
    assert viewer.layers[0].rgb and viewer.layers[0].metadata["dmoe_attributes"] == {"age": "80+"}
    assert set(np.unique(viewer.layers[1].data)) == {0, 1}
    viewer.open_sample("napari-dmoe", "retina")
    retina = viewer.layers[-1]
    assert retina.rgb and retina.data.shape[-1] == 3 and retina.data.shape[0] > 1000  # the real photograph


def test_samples_do_not_import_torch_or_download():
    code = (
        "import sys, socket\n"
        "def refuse(*a, **k): raise RuntimeError('network access')\n"
        "socket.socket.connect = refuse\n"
        "from napari_dmoe.plugin import samples as s\n"
        "for f in (s.fundus_sample, s.prostate_sample, s.skin_sample, s.retina_photo):\n"
        "    assert len(f()) >= 1\n"
        "assert 'torch' not in sys.modules and 'napari' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
