"""The inference engine on A's real tiny presets (CPU): shapes, sliding window, routing maps, progress,
unknown attributes and every bad-input message."""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference

from napari_dmoe.generators import drain
from napari_dmoe.inference.engine import InferenceError, Progress, iter_segment, segment
from napari_dmoe.model.moe import DMoE
from napari_dmoe.transforms import normalize

from inference_models import RACES, TinyModel, assert_routing_sums_to_one, rng_image, tiny


def test_2d_output_is_on_the_input_grid(model2d):
    seg = segment(model2d, rng_image(37, 53), "Black", device="cpu")
    assert seg.labels.shape == (37, 53)
    assert seg.probabilities.shape == (3, 37, 53) and seg.probabilities.dtype == np.float16
    assert np.allclose(seg.probabilities.astype(np.float32).sum(0), 1, atol=5e-3)
    assert np.array_equal(seg.labels, seg.probabilities.astype(np.float32).argmax(0)) or (
        (seg.labels == seg.probabilities.astype(np.float32).argmax(0)).mean() > 0.99  # float16 ties
    )
    assert seg.attribute == {"race": "Black"} and seg.device == "cpu"
    assert set(seg.timings) == {"preprocess", "infer", "routing", "postprocess"}
    n_pos = len([k for k in seg.routing if k != "mean"])
    assert n_pos >= 1 and "mean" in seg.routing
    assert seg.routing["mean"].shape == (model2d.spec.n_experts, 37, 53)
    assert_routing_sums_to_one(seg)
    mean = seg.routing["mean"]
    assert seg.dominant_expert.dtype == np.uint8 and seg.dominant_expert.shape == (37, 53)
    # dominant = argmax of the mean map (float16 ties aside)
    picked = np.take_along_axis(mean, seg.dominant_expert[None].astype(np.int64), 0)[0]
    assert np.all(picked >= mean.max(0) - 1e-3)


def test_3d_output_is_on_the_input_grid_with_resampling(model3d):
    spec = dataclasses.replace(model3d.spec, spacing=[2.0, 1.0, 1.0])
    model = TinyModel(spec, model3d.network)
    seg = segment(model, rng_image(20, 30, 40), "White", spacing=(3.0, 1.5, 1.0), device="cpu")
    assert seg.labels.shape == (20, 30, 40)
    assert seg.probabilities.shape == (3, 20, 30, 40)
    assert {k for k in seg.routing} >= {"mean"} and len(seg.routing) >= 2
    for m in seg.routing.values():
        assert m.shape == (spec.n_experts, 20, 30, 40)
    assert_routing_sums_to_one(seg)
    assert seg.dominant_expert.shape == (20, 30, 40)


def test_3d_sliding_window_matches_monai(model3d):
    """Our window loop (needed for progress and routing) against MONAI's sliding_window_inference."""
    image = rng_image(128, 64, 40)  # padded to 128x64x64: windows at z = 0, 48, 64
    seg = segment(model3d, image, "Asian", roi_size=(64, 64, 64), overlap=0.25, device="cpu", sw_batch_size=2)
    x = torch.from_numpy(normalize(image, model3d.spec.normalization))[None, None]
    x = torch.nn.functional.pad(x, (0, 24))  # the engine pads at the end to 64
    attr = torch.zeros(2, dtype=torch.long)  # Asian = router 0

    def predictor(w: torch.Tensor) -> torch.Tensor:
        return torch.softmax(model3d.network(w, attr[: w.shape[0]]), dim=1)

    with torch.inference_mode():
        ref = sliding_window_inference(x, (64, 64, 64), 2, predictor, overlap=0.25, mode="gaussian")
    ref = ref[0, :, :, :, :40].numpy()
    # only float16 storage of the result differs: 2**-11 relative on values <= 1
    assert np.abs(seg.probabilities.astype(np.float32) - ref).max() < 2e-3


def test_single_window_equals_a_direct_forward(model3d):
    image = rng_image(64, 64, 64)
    seg = segment(model3d, image, "Black", device="cpu")
    x = torch.from_numpy(normalize(image, model3d.spec.normalization))[None, None]
    with torch.inference_mode():
        ref = torch.softmax(model3d.network(x, torch.tensor([1])), dim=1)[0].numpy()
    assert np.abs(seg.probabilities.astype(np.float32) - ref).max() < 2e-3


def test_generator_yields_increasing_progress_and_returns(model3d):
    steps = []
    seg = drain(iter_segment(model3d, rng_image(100, 40, 50), "Asian", sw_batch_size=1, device="cpu"), steps.append)
    infer = [p for p in steps if p.stage == "infer"]
    assert all(isinstance(p, Progress) for p in steps)
    assert [p.done for p in infer] == list(range(1, len(infer) + 1)) and len(infer) > 2
    assert infer[-1].done == infer[-1].total
    assert steps[0].stage == "preprocess" and steps[-1].stage == "postprocess"
    assert seg.labels.shape == (100, 40, 50)


def test_generator_can_be_closed_between_windows(model3d):
    gen = iter_segment(model3d, rng_image(100, 40, 50), "Asian", sw_batch_size=1, device="cpu")
    seen = [next(gen) for _ in range(3)]  # preprocess + two windows
    assert seen[-1].stage == "infer" and seen[-1].done < seen[-1].total
    gen.close()
    with pytest.raises(StopIteration):
        next(gen)
    # nothing left behind: no routing hooks, network in eval mode on its device
    assert all(m._routing_sink is None for m in model3d.network.modules() if isinstance(m, DMoE))
    assert not model3d.network.training
    assert next(model3d.network.parameters()).device.type == "cpu"


def _routers_matter(model: TinyModel) -> TinyModel:
    """A copy whose routing visibly changes the output. Fresh, the tiny TransUNet's logits differ by ~1e-4
    between routers (LayerNorm and an untrained decoder wash the expert update out), which float16
    probabilities cannot show; random routers, strong experts and a steep head make the difference visible."""
    model = TinyModel(model.spec, copy.deepcopy(model.network))
    with torch.no_grad():
        for m in model.network.modules():
            if isinstance(m, DMoE):
                for expert in m.experts:
                    expert.fc2.weight.mul_(200.0)
                for router in m.routers:
                    router.gate.weight.normal_(0, 1.0)
        model.network.segmentation_head.weight.mul_(1000.0)
    return model


def test_unknown_attribute_averages_the_routers(model2d):
    model2d = _routers_matter(model2d)
    image = rng_image(40, 44)
    per_value = [segment(model2d, image, race, device="cpu") for race in RACES]
    avg = segment(model2d, image, None, device="cpu")
    assert avg.attribute == {"race": "unknown (averaged over 3 values)"}
    expected = np.mean([s.probabilities.astype(np.float32) for s in per_value], axis=0)
    assert np.abs(avg.probabilities.astype(np.float32) - expected).max() < 3e-3
    expected_mean = np.mean([s.routing["mean"].astype(np.float32) for s in per_value], axis=0)
    assert np.abs(avg.routing["mean"].astype(np.float32) - expected_mean).max() < 1e-2
    again = segment(model2d, image, {"race": "unknown"}, device="cpu")
    assert np.array_equal(again.probabilities, avg.probabilities)
    # the routers really differ, so averaging is not trivially equal to any one of them
    assert max(np.abs(s.probabilities.astype(np.float32) - expected).max() for s in per_value) > 0.01


def test_attribute_outside_the_vocabulary_lists_it(model2d):
    with pytest.raises(InferenceError, match=r"Martian.*\['Asian', 'Black', 'White'\]"):
        segment(model2d, rng_image(16, 16), "Martian", device="cpu")
    with pytest.raises(InferenceError, match="race"):
        segment(model2d, rng_image(16, 16), {"sex": "F"}, device="cpu")
    with pytest.raises(InferenceError, match="needs race"):
        segment(model2d, rng_image(16, 16), None, unknown="error", device="cpu")


def test_rgb_image_on_a_grey_model_is_converted_and_reported(model2d):
    rgb = (np.random.default_rng(2).random((30, 34, 3)) * 255).astype(np.uint8)
    seg = segment(model2d, rgb, "Asian", device="cpu")
    assert seg.labels.shape == (30, 34)
    assert any("RGB -> grey" in c for c in seg.conversions)


def test_nan_input_is_sanitized_and_reported(model2d):
    image = rng_image(24, 24).astype(np.float64)
    image[3:5, 3:6] = np.nan
    image[0, 0] = np.inf
    seg = segment(model2d, image, "Asian", device="cpu")
    assert np.isfinite(seg.probabilities.astype(np.float32)).all()
    assert any("replaced 7 NaN/Inf" in c for c in seg.conversions)


def test_constant_16bit_image_works_with_a_warning(model2d):
    seg = segment(model2d, np.full((20, 21), 1000, dtype=np.uint16), "Asian", device="cpu")
    assert seg.labels.shape == (20, 21)
    assert any("constant" in w for w in seg.warnings)


def test_2d_model_on_a_volume_goes_slice_by_slice(model2d):
    volume = rng_image(3, 20, 26)
    volume[1] = volume[1][::-1]  # the slices differ
    seg = segment(model2d, volume, "White", device="cpu")
    assert seg.labels.shape == (3, 20, 26) and seg.probabilities.shape == (3, 3, 20, 26)
    assert seg.routing["mean"].shape == (model2d.spec.n_experts, 3, 20, 26)
    assert seg.dominant_expert.shape == (3, 20, 26)
    one = segment(model2d, volume[1], "White", device="cpu")
    assert np.abs(one.probabilities.astype(np.float32) - seg.probabilities[:, 1].astype(np.float32)).max() < 1e-3
    assert any("slice by slice" in c for c in seg.conversions)


def test_2d_sliding_mode_on_a_large_image(model2d):
    size = model2d.spec.input_size
    image = rng_image(2 * size[0] + 10, size[1] + 5)
    steps = []
    seg = drain(iter_segment(model2d, image, "Black", mode2d="sliding", device="cpu", sw_batch_size=1), steps.append)
    assert max(p.total for p in steps if p.stage == "infer") > 2  # really several windows
    assert seg.labels.shape == image.shape
    assert_routing_sums_to_one(seg)


def test_3d_model_on_2d_image_is_refused(model3d):
    with pytest.raises(InferenceError, match="3D model.*2D"):
        segment(model3d, rng_image(40, 40), "Asian", device="cpu")


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((4, 40)), "too small"),
        (np.zeros((2, 3, 4, 5, 6)), "expected \\(y, x\\)"),
        (np.array([["a"] * 10] * 10), "numeric"),
    ],
)
def test_bad_images_give_clear_errors(model2d, image, message):
    with pytest.raises(InferenceError, match=message):
        segment(model2d, image, "Asian", device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_when_unavailable_is_a_clear_error(model2d):
    with pytest.raises(InferenceError, match="not usable"):
        segment(model2d, rng_image(16, 16), "Asian", device="cuda")


def test_baseline_and_plain_moe_models():
    base = tiny("transunet2d-tiny", routing="none")
    seg = segment(base, rng_image(20, 20), None, device="cpu")
    assert seg.routing == {} and seg.dominant_expert is None and seg.attribute["race"].startswith("not used")
    moe = tiny("transunet2d-tiny", routing="moe")
    seg = segment(moe, rng_image(20, 20), "Black", device="cpu")
    assert "mean" in seg.routing and "plain MoE" in seg.attribute["race"]


class _OOMOnBigBatches(torch.nn.Module):
    """A real network that raises the CUDA out-of-memory error for batches above ``limit``."""

    def __init__(self, inner: torch.nn.Module, limit: int) -> None:
        super().__init__()
        self.inner, self.limit, self.sizes = inner, limit, []

    def forward(self, x, attr):
        self.sizes.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.inner(x, attr)


def test_out_of_memory_halves_the_batch_then_gives_up(model3d):
    image = rng_image(64, 128, 64)  # three windows in one z row (3D batches never span two rows)
    net = _OOMOnBigBatches(model3d.network, limit=1)
    seg = segment(TinyModel(model3d.spec, net), image, "Asian", sw_batch_size=4, device="cpu")
    assert seg.labels.shape == (64, 128, 64) and net.sizes[0] == 3
    assert any("sw_batch_size=1" in w for w in seg.warnings) and net.sizes[-1] == 1
    never = _OOMOnBigBatches(model3d.network, limit=0)
    with pytest.raises(InferenceError, match="ran out of GPU memory.*device='cpu'"):
        segment(TinyModel(model3d.spec, never), image, "Asian", device="cpu")


def test_plan_rules_for_2d_resize_versus_sliding_and_3d_resampling(model2d, model3d):
    from napari_dmoe.inference.plan import make_plan

    spec2d = dataclasses.replace(model2d.spec, spacing=[0.5, 0.5])
    near = make_plan(spec2d, (100, 90), None, None, 0.25)
    assert near.mode == "resize" and near.work == (64, 64)  # FairSeg style: the whole image to input_size
    far = make_plan(spec2d, (300, 90), None, None, 0.25)  # > 2x input_size on one axis, at the model's scale
    assert far.mode == "sliding" and far.work == (300, 90) and len(far.starts) > 4
    scaled = make_plan(spec2d, (300, 90), (0.25, 0.25), None, 0.25)  # finer pixels: shrunk to 0.5 first
    assert scaled.work == (150, 45)
    assert make_plan(model2d.spec, (300, 90), None, None, 0.25).mode == "resize"  # no spacing: never slides
    spec3d = dataclasses.replace(model3d.spec, spacing=[2.0, 1.0, 1.0])
    plan = make_plan(spec3d, (20, 30, 40), (3.0, 1.5, 1.0), None, 0.25)
    assert plan.work == (30, 45, 40) and plan.padded == (64, 64, 64) and plan.roi == (64, 64, 64)
    with pytest.raises(InferenceError, match="multiples of 32"):
        make_plan(spec3d, (64, 64, 64), None, (48, 64, 64), 0.25)


def test_grey_image_on_an_rgb_model_is_repeated_and_reported():
    rgb_model = tiny("transunet2d-tiny", in_channels=3)
    seg = segment(rgb_model, rng_image(30, 30), "Asian", device="cpu")
    assert seg.labels.shape == (30, 30)
    assert any("repeated" in c for c in seg.conversions)


def test_the_engine_never_imports_qt_or_napari():
    import subprocess
    import sys

    code = (
        "import sys, napari_dmoe.inference.engine; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('napari', 'qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_routing_modes_keep_positions_or_only_the_mean(model3d, monkeypatch):
    import napari_dmoe.inference.engine as engine

    image = rng_image(40, 40, 40)
    every = segment(model3d, image, "Black", device="cpu", routing="all")
    mean_only = segment(model3d, image, "Black", device="cpu", routing="mean")
    assert set(every.routing) == {"mean", "stage0", "stage1", "stage2", "stage3", "stage4"}
    assert set(mean_only.routing) == {"mean"}
    # the mean map and dominant expert do not depend on whether per-position maps are kept
    assert np.array_equal(every.routing["mean"], mean_only.routing["mean"])
    assert np.array_equal(every.dominant_expert, mean_only.dominant_expert)
    positions = np.mean([every.routing[f"stage{i}"].astype(np.float32) for i in range(5)], axis=0)
    assert np.abs(positions - every.routing["mean"].astype(np.float32)).max() < 2e-3
    # "auto" (routing=True) drops per-position maps above the size limit and says so
    monkeypatch.setattr(engine, "AUTO_ALL_BYTES", 1000)
    auto = segment(model3d, image, "Black", device="cpu", routing=True)
    assert set(auto.routing) == {"mean"} and any("routing='all'" in w for w in auto.warnings)
    with pytest.raises(InferenceError, match="routing="):
        segment(model3d, image, "Black", device="cpu", routing="some")


# --- streamed 3D inference (inference_volume.py): equal to the whole-volume path, slab by slab ---------------
