"""Speed options of the inference engine: channels-last and torch.compile give the eager results, and a compile
that fails or disagrees falls back to the eager network with a warning instead of failing the segmentation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from inference_models import rng_image, tiny
from napari_dmoe.cli.main import main
from napari_dmoe.inference.engine import segment
from napari_dmoe.inference.runner import memory_format


def _same(a, b, atol=1e-3):
    """Probabilities are stored as float16 (a step is 2.4e-4 near 0.5): another summation order may move one
    step, and a near-tie label may flip with it."""
    np.testing.assert_allclose(a.probabilities.astype(np.float32), b.probabilities.astype(np.float32), atol=atol)
    if atol == 0:
        np.testing.assert_array_equal(a.labels, b.labels)
    else:
        assert (a.labels == b.labels).mean() > 0.999
    assert a.routing.keys() == b.routing.keys()
    for key in a.routing:
        np.testing.assert_allclose(a.routing[key].astype(np.float32), b.routing[key].astype(np.float32), atol=2e-3)


@pytest.mark.parametrize("preset, shape", [("transunet2d-tiny", (70, 90)), ("resunet3d-tiny", (64, 64, 70))])
def test_channels_last_gives_the_same_result_and_restores_the_layout(preset, shape):
    model = tiny(preset)
    image = rng_image(*shape)
    plain = segment(model, image, "Black", device="cpu")
    fast = segment(model, image, "Black", device="cpu", channels_last=True)
    _same(plain, fast)
    conv = next(p for p in model.network.parameters() if p.dim() >= 4)
    assert conv.is_contiguous(), "the network must be back in the default layout after the run"
    assert memory_format(model.network) == (torch.channels_last_3d if len(shape) == 3 else torch.channels_last)


def test_a_failing_compile_falls_back_to_the_eager_network(monkeypatch):
    model = tiny("transunet2d-tiny")
    image = rng_image(64, 64)
    plain = segment(model, image, "Asian", device="cpu")

    def broken_compile(network, **_):
        def run(*args, **kwargs):
            raise RuntimeError("no C++ compiler found\nlong backend log")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    seg = segment(model, image, "Asian", device="cpu", compile=True)
    _same(plain, seg, atol=0)
    assert any("torch.compile failed (RuntimeError: no C++ compiler found)" in w for w in seg.warnings), seg.warnings
    again = segment(model, image, "Asian", device="cpu", compile=True)  # not tried again for this network
    assert not any("torch.compile" in w for w in again.warnings), again.warnings


def test_a_compiled_network_that_disagrees_is_not_used(monkeypatch):
    model = tiny("transunet2d-tiny")
    image = rng_image(64, 64)
    plain = segment(model, image, "White", device="cpu")
    calls = []

    def wrong_compile(network, **_):
        def run(x, attr):
            calls.append(x.shape[0])
            return network(x, attr) * -1.0  # flips every softmax decision
        return run

    monkeypatch.setattr(torch, "compile", wrong_compile)
    seg = segment(model, image, "White", device="cpu", compile=True, sw_batch_size=3)
    _same(plain, seg, atol=0)
    assert any("differs from the eager one" in w for w in seg.warnings), seg.warnings
    assert calls == [3], "the one image is padded to the window batch, and the compiled form is dropped after it"


@pytest.mark.slow
def test_real_torch_compile_matches_eager_and_keeps_routing():
    """The real thing on the CPU (inductor needs a C++ compiler; the suite's machines have gcc)."""
    model = tiny("transunet2d-tiny")
    image = rng_image(80, 80)
    plain = segment(model, image, "Black", device="cpu")
    first = segment(model, image, "Black", device="cpu", compile=True)
    if any("torch.compile" in w for w in first.warnings):
        pytest.skip(f"torch.compile unavailable on this machine: {first.warnings}")
    _same(plain, first)
    compiled = getattr(model.network, "_dmoe_compiled")
    assert isinstance(compiled, torch.nn.Module)
    assert not any(k.startswith("_dmoe") for k in model.network.state_dict()), "the compiled form is not a submodule"
    second = segment(model, image, "Asian", device="cpu", compile=True)  # reuses the compiled form
    assert getattr(model.network, "_dmoe_compiled") is compiled
    _same(segment(model, image, "Asian", device="cpu"), second)


def test_cli_accepts_the_speed_options(tmp_path, capsys):
    from napari_dmoe.io.checkpoint import save_model
    from PIL import Image

    model = tiny("transunet2d-tiny")
    path = tmp_path / "m.safetensors"
    save_model(path, model.network, model.spec)
    Image.fromarray(rng_image(60, 60).clip(0, 255).astype(np.uint8)).save(tmp_path / "in.png")
    out = tmp_path / "out.png"
    assert main(["segment", str(path), str(tmp_path / "in.png"), "-a", "Black", "-o", str(out), "--device", "cpu",
                 "--channels-last", "--quiet"]) == 0
    labels = np.asarray(Image.open(out))
    expected = segment(model, np.asarray(Image.open(tmp_path / "in.png")).astype(np.float32), "Black", device="cpu")
    np.testing.assert_array_equal(labels, expected.labels)
