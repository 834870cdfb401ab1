"""transforms.py and devices.py: normalisation kinds, channel handling, NaN/Inf handling, device choice."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_dmoe.devices import DeviceError, resolve_device
from napari_dmoe.transforms import TransformError, normalize, sanitize, to_channels


def test_zscore_ignores_nan_and_gives_zero_mean_unit_std():
    image = np.array([[1.0, 2.0, np.nan], [3.0, 4.0, 5.0]], dtype=np.float64)
    out = normalize(image, {"kind": "zscore"})
    assert out.dtype == np.float32
    finite = out[np.isfinite(out)]
    assert abs(finite.mean()) < 1e-6 and abs(finite.std() - 1) < 1e-5
    assert np.isnan(out[0, 2])  # normalize does not invent values; sanitize does that


def test_zscore_of_a_constant_image_is_zero_not_nan():
    out = normalize(np.full((4, 5), 7, dtype=np.uint16), {"kind": "zscore"})
    assert np.all(out == 0)


def test_minmax_window_and_scale():
    image = np.array([-300.0, 0.0, 50.0, 400.0])
    assert np.allclose(normalize(image, {"kind": "minmax"}), [0.0, 300 / 700, 350 / 700, 1.0])
    window = normalize(image, {"kind": "window", "low": -200, "high": 300})
    assert np.allclose(window, [0.0, 0.4, 0.5, 1.0])  # clipped outside the window
    assert np.allclose(normalize(np.array([0, 51, 255], dtype=np.uint8), {"kind": "scale", "factor": 255}), [0, 0.2, 1])


def test_bad_normalization_is_a_clear_error():
    with pytest.raises(TransformError, match="expected one of"):
        normalize(np.ones((3, 3)), {"kind": "histogram"})
    with pytest.raises(TransformError, match="below high"):
        normalize(np.ones((3, 3)), {"kind": "window", "low": 5, "high": 5})


def test_sanitize_replaces_nan_and_inf_and_counts_them():
    image = np.array([[np.nan, 1.0], [np.inf, -np.inf], [3.0, 2.0]])
    out, n = sanitize(image)
    assert n == 3 and out.dtype == np.float32
    assert out[0, 0] == 1.0 and out[1, 1] == 1.0 and out[1, 0] == 3.0  # NaN/-Inf -> min, +Inf -> max
    assert np.isnan(image[0, 0])  # input untouched
    all_bad, n = sanitize(np.full((2, 2), np.nan))
    assert n == 4 and np.all(all_bad == 0)


def test_sanitize_refuses_non_numeric():
    with pytest.raises(TransformError, match="numeric"):
        sanitize(np.array([["a", "b"]]))


def test_rgb_to_grey_uses_luminance_and_reports_it():
    rgb = np.zeros((4, 5, 3), dtype=np.uint8)
    rgb[..., 1] = 200  # pure green
    out, notes = to_channels(rgb, 1, rgb=True)
    assert out.shape == (1, 4, 5)
    assert np.allclose(out, 0.7154 * 200, atol=1e-3)  # keeps the 0..255 scale
    assert any("RGB -> grey" in n for n in notes)


def test_rgba_drops_alpha_and_grey_repeats_to_three_channels():
    rgba = np.random.default_rng(0).integers(0, 255, (6, 7, 4)).astype(np.uint8)
    out, notes = to_channels(rgba, 3, rgb=True)
    assert out.shape == (3, 6, 7) and np.array_equal(out[2], rgba[..., 2])
    assert any("alpha" in n for n in notes)
    grey, notes = to_channels(np.arange(12.0).reshape(3, 4), 3)
    assert grey.shape == (3, 3, 4) and np.array_equal(grey[0], grey[2])
    assert any("repeated" in n for n in notes)
    same, notes = to_channels(np.ones((3, 4)), 1)
    assert same.shape == (1, 3, 4) and notes == []


def test_resolve_device_cpu_and_auto():
    device, reason = resolve_device("cpu")
    assert device.type == "cpu" and reason
    device, reason = resolve_device("auto")
    if not torch.cuda.is_available():
        assert device.type in ("cpu", "mps")
        if device.type == "cpu":
            assert "no GPU" in reason  # says why


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_forcing_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(DeviceError, match="not usable.*device='cpu'"):
        resolve_device("cuda")


def test_unknown_device_name_is_a_clear_error():
    with pytest.raises(DeviceError, match="not understood"):
        resolve_device("tpu-ish")
