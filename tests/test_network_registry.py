"""Adding a network = one class plus one registry entry: a tiny network defined here segments, trains and
evaluates through the real engines, and nothing else in the package had to learn about it."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from napari_dmoe.model import PRESETS, build_network, make_spec, registry
from napari_dmoe.model.moe import DMoE
from napari_dmoe.model.registry import InputRule, Preset
from napari_dmoe.model.spec import SpecError
from napari_dmoe.model.routers import default_attr
from napari_dmoe.model.spec import InputShapeError
from training_data import tiny_config, write_fairseg

ARCH = "tinyconv2d"


class TinyConvNet(nn.Module):
    """Two stride-2 convs, one dMoE over the 1/4-resolution tokens, a transposed conv back: any size that is a
    multiple of 4 and at least 16 goes through."""

    spatial_dims = 2
    presets = {"tiny": Preset({"width": 8}, input_size=(32, 32))}

    @classmethod
    def input_rule(cls, arch_kwargs: dict) -> InputRule:
        return InputRule(divisor=4, min_size=16)

    @classmethod
    def routing_positions(cls, arch_kwargs: dict) -> list[str]:
        return ["mid"]

    def __init__(self, in_channels: int = 1, n_classes: int = 2, n_routers: int = 0, n_experts: int = 4,
                 top_k: int = 2, width: int = 8) -> None:
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(in_channels, width, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU())
        self.moe = nn.ModuleList([DMoE(width, n_routers, n_experts, top_k)]) if n_routers else None
        self.up = nn.ConvTranspose2d(width, n_classes, 4, stride=4)

    def forward(self, x: torch.Tensor, attr: torch.Tensor | None = None) -> torch.Tensor:
        problem = self.input_rule({}).problem(x.shape[2:])
        if problem:
            raise InputShapeError(f"TinyConvNet: sizes {tuple(x.shape[2:])} {problem}")
        attr = default_attr(attr, x, self.moe)
        h = self.down(x)
        if self.moe is not None:
            b, c, *grid = h.shape
            tokens = h.flatten(2).transpose(1, 2)
            h = h + self.moe[0](tokens, attr, position="mid", grid=grid).transpose(1, 2).reshape(h.shape)
        return self.up(h)


@pytest.fixture
def tiny_network():
    registry.register(ARCH, TinyConvNet)
    yield TinyConvNet
    registry.unregister(ARCH)


def test_a_registered_network_is_known_everywhere(tiny_network):
    assert f"{ARCH}-tiny" in PRESETS and PRESETS[f"{ARCH}-tiny"] == {"width": 8}
    spec = make_spec(f"{ARCH}-tiny", "race", ["Asian", "Black", "White"], ["bg", "disc"], width=12)
    assert spec.arch == ARCH and spec.spatial_dims == 2 and spec.input_size == [32, 32]
    assert spec.arch_kwargs == {"width": 12}  # a constructor keyword goes to arch_kwargs, not to the spec
    assert registry.routing_positions(spec) == ["mid"] and registry.preset_for(spec) == f"{ARCH}-tiny"
    assert isinstance(build_network(spec), TinyConvNet)
    with pytest.raises(SpecError, match="multiples of 4"):
        make_spec(f"{ARCH}-tiny", "race", ["A"], ["bg", "fg"], input_size=[30, 32])
    with pytest.raises(SpecError, match="already registered"):
        registry.register(ARCH, nn.Identity)


def test_unregistered_network_is_refused_by_name():
    with pytest.raises(SpecError, match="unknown preset"):
        make_spec(f"{ARCH}-tiny", "race", ["A"], ["bg", "fg"])
    from napari_dmoe.model.spec import ModelSpec

    with pytest.raises(SpecError, match="expected one of"):
        ModelSpec(arch=ARCH, class_names=["bg", "fg"], attributes=[{"name": "race", "values": ["A"]}])


def test_segment_with_the_new_network_uses_its_input_rule(tiny_network):
    from napari_dmoe.inference.engine import segment
    from napari_dmoe.inference.plan import InferenceError, make_plan

    torch.manual_seed(0)
    spec = make_spec(f"{ARCH}-tiny", "race", ["Asian", "Black", "White"], ["bg", "disc"], spacing=[1.0, 1.0])
    model = type("M", (), {"spec": spec, "network": build_network(spec).eval()})()
    image = np.random.default_rng(0).normal(size=(45, 37)).astype(np.float32)
    whole = segment(model, image, "Black", device="cpu")  # resized whole to 32x32 and back
    assert whole.labels.shape == image.shape and set(whole.routing) == {"mid", "mean"}
    assert whole.attribute == {"race": "Black"}
    # sliding: windows of the input size on a grid padded to multiples of 4 (the network's rule, not 2D's)
    plan = make_plan(spec, (90, 70), (1.0, 1.0), None, 0.25, mode2d="sliding")
    assert plan.padded == (92, 72) and plan.roi == (32, 32) and len(plan.starts) > 4
    slid = segment(model, np.resize(image, (90, 70)), "Black", device="cpu", mode2d="sliding")
    assert slid.probabilities.shape == (2, 90, 70)
    np.testing.assert_allclose(slid.probabilities.astype(np.float32).sum(0), 1.0, atol=2e-2)
    with pytest.raises(InferenceError, match="multiples of 4"):
        make_plan(spec, (90, 70), (1.0, 1.0), (30, 32), 0.25, mode2d="sliding")


@pytest.mark.slow
def test_train_two_steps_and_evaluate_with_the_new_network(tmp_path, tiny_network):
    from napari_dmoe.cli.main import main
    from napari_dmoe.io.checkpoint import load_model, read_spec
    from napari_dmoe.training.config import load_config
    from napari_dmoe.training.engine import train

    data = write_fairseg(tmp_path / "fairseg", n_train=6, n_test=3)
    config_path = tiny_config(tmp_path / "c.yaml", tmp_path / "run",
                              {"format": "fairseg", "root": str(data), "attributes": "race", "crop": None},
                              preset=f"{ARCH}-tiny", recipe={"steps": 2, "batch_size": 2, "val_every": 2})
    best = train(load_config(config_path), device="cpu", quiet=True)
    model = load_model(best)
    assert isinstance(model.network, TinyConvNet) and model.spec.arch == ARCH
    assert read_spec(best).to_dict() == model.spec.to_dict()  # the same self-describing file as shipped networks
    out = tmp_path / "eval"
    assert main(["evaluate", str(best), str(config_path), "--out", str(out), "--n-boot", "20", "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["n_images"] == 3 and 0.0 <= report["mean_over_classes"]["dice"] <= 1.0
