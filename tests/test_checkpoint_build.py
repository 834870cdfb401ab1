"""load_model builds the network once (the meta build that bounds its size takes the file's tensors), with results
identical to building it for real and copying the weights in, and falls back to that where it must."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import napari_dmoe.model as model_pkg
from napari_dmoe.io.checkpoint import _match_weights, load_model, save_model
from napari_dmoe.model import build_network, make_spec, registry
from napari_dmoe.model.moe import DMoE, apply_local_experts

ASSETS = Path(__file__).resolve().parents[1] / "napari_dmoe" / "assets" / "models"


def _copy_loaded(path: Path, spec) -> nn.Module:
    """The previous way: a real build, the weights copied in."""
    network = build_network(spec)
    network.load_state_dict(_match_weights(path, network, load_file(str(path))), strict=True)
    return network.eval()


def _counting_builds(monkeypatch) -> list:
    calls: list = []
    real = model_pkg.build_network

    def counted(spec):
        calls.append(spec)
        return real(spec)

    monkeypatch.setattr(model_pkg, "build_network", counted)
    return calls


@pytest.mark.parametrize("name", ["fundus-dmoe", "prostate-dmoe"])
def test_bundled_models_build_once_and_match_a_copy_load(name, monkeypatch):
    path = ASSETS / f"{name}.safetensors"
    calls = _counting_builds(monkeypatch)
    model = load_model(path)
    assert len(calls) == 1
    monkeypatch.undo()
    ref = _copy_loaded(path, model.spec)
    params = list(model.network.parameters())
    assert not any(p.is_meta for p in params) and len({id(p) for p in params}) == len(list(ref.parameters()))
    x = torch.randn(2, model.spec.in_channels, *model.spec.input_size, generator=torch.Generator().manual_seed(0))
    attr = torch.tensor([0, 1])
    with torch.no_grad():
        assert torch.equal(model.network(x, attr), ref(x, attr))  # bit for bit, weights aligned as torch's own


def test_local_experts_load_on_the_fast_path(tmp_path, monkeypatch):
    spec = make_spec("transunet2d-tiny", "race", ["Asian", "Black", "White"], ["bg", "disc"], img_size=32)
    network = build_network(spec)
    apply_local_experts(network, [[[1, 0], [1, 2]]])
    spec.local_experts = [[[1, 0], [1, 2]]]
    save_model(tmp_path / "m.safetensors", network, spec)
    calls = _counting_builds(monkeypatch)
    model = load_model(tmp_path / "m.safetensors")
    assert len(calls) == 1
    layer = next(m for m in model.network.modules() if isinstance(m, DMoE))
    assert layer.local_table == [(1, 0), (1, 2)] and not layer._local_remap.is_meta
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.network(x, torch.tensor([1])), network.eval()(x, torch.tensor([1])))


class WithScratch(nn.Module):
    """A network whose constructor makes a tensor the file does not hold (a non-persistent buffer)."""

    spatial_dims = 2
    presets = {"tiny": registry.Preset({}, input_size=(16, 16))}

    @classmethod
    def input_rule(cls, arch_kwargs: dict) -> registry.InputRule:
        return registry.InputRule(divisor=1, min_size=1)

    @classmethod
    def routing_positions(cls, arch_kwargs: dict) -> list[str]:
        return []

    def __init__(self, in_channels=1, n_classes=2, n_routers=0, n_experts=4, top_k=2) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, n_classes, 1)
        self.register_buffer("scale", torch.full((1,), 2.0), persistent=False)

    def forward(self, x, attr=None):
        return self.conv(x) * self.scale


def test_a_tensor_outside_the_file_falls_back_to_a_real_build(tmp_path, monkeypatch):
    registry.register("withscratch", WithScratch)
    try:
        spec = make_spec("withscratch-tiny", "race", ["A"], ["bg", "fg"], routing="none")
        network = build_network(spec)
        save_model(tmp_path / "s.safetensors", network, spec)
        calls = _counting_builds(monkeypatch)
        model = load_model(tmp_path / "s.safetensors")
        assert len(calls) == 2  # meta (size bound), then the real one
        assert float(model.network.scale) == 2.0
        x = torch.randn(1, 1, 16, 16)
        with torch.no_grad():
            assert torch.equal(model.network(x), network(x))
    finally:
        registry.unregister("withscratch")
