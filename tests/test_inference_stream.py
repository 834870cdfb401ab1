"""3D streaming inference: slab-by-slab accumulation equals the whole-volume path."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from napari_dmoe.generators import drain
from napari_dmoe.inference.engine import iter_segment, segment

from inference_models import TinyModel, rng_image


@pytest.mark.parametrize(
    "shape, spacing, attribute",
    [
        ((200, 40, 50), None, "Asian"),  # rows of windows at z = 0, 48, 96, 144, 160 (pads 200 -> 224)
        ((36, 30, 40), (9.0, 1.5, 1.0), None),  # z resampled 36 -> 162 planes and back; 3 routers mixed
    ],
)
def test_streamed_3d_equals_the_whole_volume_path(model3d, monkeypatch, shape, spacing, attribute):
    import napari_dmoe.inference.engine as engine

    spec = dataclasses.replace(model3d.spec, spacing=[2.0, 1.0, 1.0]) if spacing else model3d.spec
    model = TinyModel(spec, model3d.network)
    image = rng_image(*shape)
    opts = dict(spacing=spacing, device="cpu", routing="all", sw_batch_size=3)
    steps = []
    streamed = drain(iter_segment(model, image, attribute, **opts), steps.append)
    monkeypatch.setattr(engine, "STREAM_3D", False)
    whole = segment(model, image, attribute, **opts)
    from napari_dmoe.inference.plan import make_plan

    plan = make_plan(spec, shape, spacing, None, 0.25)
    assert len({s[0] for s in plan.starts}) >= 4  # several rows of windows, so several slabs
    assert max(p.total for p in steps if p.stage == "infer") >= 4
    assert streamed.probabilities.shape == whole.probabilities.shape == (3, *shape)
    # float16 storage: the two differ by at most one unit in the last place (2**-11 on values in [0.5, 1])
    assert np.abs(streamed.probabilities.astype(np.float32) - whole.probabilities.astype(np.float32)).max() <= 2**-11
    assert (streamed.labels != whole.labels).mean() < 1e-3  # argmax flips only at float16 ties
    assert set(streamed.routing) == set(whole.routing) == {"mean", "stage0", "stage1", "stage2", "stage3", "stage4"}
    for key, m in whole.routing.items():
        assert np.abs(streamed.routing[key].astype(np.float32) - m.astype(np.float32)).max() <= 2**-11, key
    assert (streamed.dominant_expert != whole.dominant_expert).mean() < 1e-3
    assert streamed.attribute == whole.attribute and streamed.warnings == whole.warnings


def test_streamed_3d_input_matches_the_whole_volume_preprocessing(model3d):
    """Each window is made from the raw image; it must equal the same window of the whole preprocessed grid."""
    from napari_dmoe.inference.engine import _to_work_grid
    from napari_dmoe.inference.plan import check_image, make_plan, prepare_image
    from napari_dmoe.inference.volume_input import VolumeInput

    spec = dataclasses.replace(model3d.spec, spacing=[2.0, 1.0, 1.0], normalization={"kind": "zscore"})
    image = np.random.default_rng(3).integers(-1000, 1000, size=(50, 120, 21)).astype(np.float32)
    image[2, 3, 4], image[5, 6, 7] = np.nan, np.inf
    spacing = (3.0, 0.7, 1.9)  # z upsampled, y downsampled, x upsampled
    array, grid, rgb, spacing = check_image(spec, image, spacing, None)
    plan = make_plan(spec, grid, spacing, None, 0.25)
    source = VolumeInput(spec, array, rgb, plan)
    stack, _, _, notes, _ = prepare_image(spec, image, spacing, None)
    whole = _to_work_grid(stack, plan)[0]
    assert source.notes == notes and len(plan.starts) > 1
    for start in plan.starts:
        window = whole[(slice(None), *(slice(s, s + r) for s, r in zip(start, plan.roi)))]
        assert torch.allclose(source.window(start, plan.roi), window, atol=1e-5)


def test_linear_stream_resizes_like_interpolate_plane_by_plane():
    from napari_dmoe.inference.routing import LinearStream

    volume = torch.rand(2, 37, 5, 6)
    for n_out in (37, 12, 90):
        ref = torch.nn.functional.interpolate(volume[None], size=(n_out, 5, 6), mode="trilinear")[0]
        asked = []
        stream = LinearStream(37, n_out, lambda i: asked.append(i) or volume[:, i])
        planes = torch.stack([stream.get(j) for j in range(n_out)], dim=1)
        assert torch.allclose(planes, ref, atol=1e-6), n_out
        assert asked == sorted(asked) and len(stream.cache) <= 2  # input planes pulled in order, few kept
        assert all(stream.needs(j) <= stream.needs(j + 1) for j in range(n_out - 1))


def test_routing_accumulator_slab_keeps_only_its_depth_and_moves_on():
    from napari_dmoe.inference.routing import RoutingAccumulator

    whole = RoutingAccumulator(1, (96, 8, 8), (32, 8, 8), 4, "gaussian")
    slab = RoutingAccumulator(1, (96, 8, 8), (32, 8, 8), 4, "gaussian", depth=40)
    rng = torch.Generator().manual_seed(0)
    for z in (0, 32, 64):  # rows of windows; the slab advances past each finished row but the last 8 planes
        w = torch.rand(3, 16, 4, 4, generator=rng)
        w /= w.sum(0)
        whole.add("stage0", 0, (z, 0, 0), w)
        slab.add("stage0", 0, (z, 0, 0), w)
        assert slab.sums["stage0"].shape[2] == 20  # 40 planes at 2 voxels per cell, whatever the volume depth
        for c in range(slab.base // 2, (z + 32) // 2):
            expected = whole.sums["stage0"][0, :, c] / whole.weights["stage0"][0, :, c].clamp_min(1e-12)
            assert torch.allclose(slab.cell_plane("stage0", c), expected)
        slab.advance(z + 32 - 8)
    assert slab.base == 88


def test_unknown_voxel_size_is_said_for_a_model_that_expects_one():
    from inference_models import rng_image, tiny

    model = tiny("resunet3d-tiny", spacing=[3.0, 3.0, 3.0])
    image = rng_image(40, 48, 48)
    unknown = segment(model, image, "Black", device="cpu", routing=False)
    assert any("voxel size of this volume is unknown" in w and "3x3x3 mm" in w for w in unknown.warnings)
    known = segment(model, image, "Black", device="cpu", routing=False, spacing=(3.0, 3.0, 3.0))
    assert not any("voxel size" in w for w in known.warnings), known.warnings
    np.testing.assert_array_equal(unknown.labels, known.labels)  # same grid: nothing was resampled either way


def test_a_layer_scale_counts_as_voxel_size_only_when_known():
    """The rule the Segment widget and the fine-tune export share (napari_dmoe.io.images.layer_spacing)."""
    from napari.layers import Image

    from napari_dmoe.io.images import layer_spacing

    def spacing(layer):
        return layer_spacing(layer.scale, layer.metadata)

    volume = np.zeros((4, 5, 6), dtype=np.float32)
    assert spacing(Image(volume)) is None  # e.g. a TIFF stack: unit scale says nothing
    assert spacing(Image(volume, scale=(3.0, 0.8, 0.8))) == (3.0, 0.8, 0.8)  # someone set it
    assert spacing(Image(volume, metadata={"spacing_known": True})) == (1.0, 1.0, 1.0)  # our NIfTI reader
    assert spacing(Image(volume, scale=(2.0, 1.0, 1.0), metadata={"spacing_known": False})) is None


@pytest.mark.parametrize("top", [4095, 65535])
def test_streamed_3d_converts_bit_depth_as_the_whole_volume_path(model3d, monkeypatch, top):
    """A 12-bit volume stored in 16 bits is divided by 4095 on both paths (the streamed one used to go by the
    dtype alone, so the fit check and the whole-volume path saw other intensities than the windows did)."""
    import napari_dmoe.inference.engine as engine

    spec = dataclasses.replace(model3d.spec, normalization={"kind": "scale", "factor": 255.0})
    model = TinyModel(spec, model3d.network)
    image = (np.random.default_rng(3).random((40, 36, 36)) * top).astype(np.uint16)
    streamed = segment(model, image, "Asian", device="cpu")
    monkeypatch.setattr(engine, "STREAM_3D", False)
    whole = segment(model, image, "Asian", device="cpu")
    assert np.abs(streamed.probabilities.astype(np.float32) - whole.probabilities.astype(np.float32)).max() <= 2**-11
    assert streamed.conversions == whole.conversions
    assert any("4095" in note for note in streamed.conversions) == (top == 4095)
