"""Networks: presets build, tiny forwards give the right shapes, routing capture, size errors, MoE placement."""
from __future__ import annotations

import pytest
import torch

from napari_dmoe.model import PRESETS, build_network, make_spec
from napari_dmoe.model.moe import DMoE, capture_routing
from napari_dmoe.model.reference import loop_dmoe
from napari_dmoe.model.resunet3d import nearest_valid_sizes
from napari_dmoe.model.spec import SpecError
from napari_dmoe.model.spec import InputShapeError

RACE = ["Asian", "Black", "White"]
STAGE = ["T1", "T2", "T3", "T4"]


def spec_for(preset: str, routing: str = "dmoe", **kw):
    if preset.startswith("transunet"):
        return make_spec(preset, "race", RACE, ["background", "rim", "cup"], routing=routing, **kw)
    return make_spec(preset, "stage", STAGE, ["background", "prostate"], routing=routing, **kw)


def n_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_builds_with_one_router_per_value(preset):
    torch.manual_seed(0)
    spec = spec_for(preset)
    net = build_network(spec)
    moes = [m for m in net.modules() if isinstance(m, DMoE)]
    assert moes and all(m.n_attr == spec.n_routers for m in moes)
    assert len(moes) == (1 if preset.startswith("transunet") else 5)  # shared in 2D, one per stage in 3D
    if preset == "transunet2d-paper":  # ViT-B/16 (~86M) + CUP decoder + 8 experts of 768x3072x2
        assert 125e6 < n_params(net) < 135e6


@pytest.mark.parametrize("routing,n_moe", [("none", 0), ("moe", 1), ("dmoe", 3)])
def test_routing_modes_control_moe_modules(routing, n_moe):
    net = build_network(spec_for("transunet2d-tiny", routing))
    routers = [len(m.routers) for m in net.modules() if isinstance(m, DMoE)]
    assert routers == ([] if n_moe == 0 else [n_moe])


def test_transunet_tiny_forward_capture_and_attribute():
    torch.manual_seed(0)
    net = build_network(spec_for("transunet2d-tiny")).eval()
    x = torch.randn(2, 1, 64, 64)
    attr = torch.tensor([0, 2])
    with torch.no_grad():
        plain = net(x, attr)
        with capture_routing(net) as records:
            captured = net(x, attr)
        other = net(x, torch.tensor([1, 2]))
    assert plain.shape == (2, 3, 64, 64)
    assert torch.equal(plain, captured)
    assert [r.position for r in records] == ["block0", "block1"]
    for r in records:
        assert r.weights.shape == (2, 8, 4, 4)
        torch.testing.assert_close(r.weights.sum(1), torch.ones(2, 4, 4))
    assert not torch.allclose(plain[0], other[0], atol=1e-4)  # the attribute matters
    torch.testing.assert_close(plain[1], other[1], atol=1e-5, rtol=0)


def test_transunet_per_block_moe_and_rgb_input():
    torch.manual_seed(0)
    spec = spec_for("transunet2d-tiny", in_channels=3, moe_per_block=True)
    net = build_network(spec).eval()
    assert len([m for m in net.modules() if isinstance(m, DMoE)]) == spec.arch_kwargs["depth"]
    with torch.no_grad():
        assert net(torch.randn(1, 3, 64, 64), torch.tensor([1])).shape == (1, 3, 64, 64)


def test_transunet_equals_manual_block_loop_with_reference_moe():
    # The dMoE step is h + dmoe(h) after every block, with the shared layer; recompute it by hand.
    torch.manual_seed(0)
    net = build_network(spec_for("transunet2d-tiny")).eval()
    x, attr = torch.randn(2, 1, 64, 64), torch.tensor([2, 0])
    t = net.transformer
    with torch.no_grad():
        h = t.embeddings(x.repeat(1, 3, 1, 1))
        for block in t.encoder.layer:
            h = block(h)
            h = h + loop_dmoe(t.encoder.moe[0], h, attr)
        expected = net.segmentation_head(net.decoder(t.encoder.encoder_norm(h), (4, 4)))
        torch.testing.assert_close(net(x, attr), expected, atol=1e-5, rtol=1e-5)


def test_transunet_rejects_wrong_size_and_missing_attr():
    net = build_network(spec_for("transunet2d-tiny")).eval()
    with pytest.raises(InputShapeError, match="64, 64"):
        net(torch.randn(1, 1, 48, 48), torch.tensor([0]))
    with pytest.raises(ValueError, match="pass attr"):
        net(torch.randn(1, 1, 64, 64))
    baseline = build_network(spec_for("transunet2d-tiny", "none")).eval()
    with torch.no_grad():
        assert baseline(torch.randn(1, 1, 64, 64)).shape == (1, 3, 64, 64)


def test_resunet3d_tiny_forward_and_capture():
    torch.manual_seed(0)
    net = build_network(spec_for("resunet3d-tiny")).eval()
    x = torch.randn(1, 1, 64, 64, 64)
    with torch.no_grad():
        plain = net(x, torch.tensor([3]))
        with capture_routing(net) as records:
            captured = net(x, torch.tensor([3]))
    assert plain.shape == (1, 2, 64, 64, 64)
    assert torch.equal(plain, captured)
    assert [r.position for r in records] == [f"stage{i}" for i in range(5)]
    assert [tuple(r.weights.shape[2:]) for r in records] == [(32,) * 3, (16,) * 3, (8,) * 3, (4,) * 3, (2,) * 3]
    assert [r.weights.shape[1] for r in records] == [8] * 5


def test_resunet3d_size_error_names_size_and_valid_sizes():
    net = build_network(spec_for("resunet3d-tiny")).eval()
    with pytest.raises(InputShapeError, match=r"divisible by 32.*\(64, 64, 80\).*80 -> 64 or 96"):
        net(torch.randn(1, 1, 64, 64, 80), torch.tensor([0]))
    with pytest.raises(InputShapeError, match="at least 64"):
        net(torch.randn(1, 1, 32, 64, 64), torch.tensor([0]))
    assert nearest_valid_sizes(100) == (96, 128) and nearest_valid_sizes(10) == (64, 64)


def test_bad_arch_kwargs_are_spec_errors():
    spec = spec_for("transunet2d-tiny")
    spec.arch_kwargs["decoder_channels"] = [8, 8]  # patch 16 needs 4 upsampling blocks
    with pytest.raises(SpecError, match="4 decoder_channels"):
        build_network(spec)
    spec.arch_kwargs = {"wings": 2}
    with pytest.raises(SpecError, match="wings"):
        build_network(spec)
    with pytest.raises(SpecError, match="unknown preset"):
        make_spec("unet9000", "race", RACE, ["bg", "fg"])


def test_make_spec_sets_input_size_and_overrides():
    spec = spec_for("transunet2d-small", img_size=96, normalization={"kind": "minmax"})
    assert spec.input_size == [96, 96] and spec.arch_kwargs["img_size"] == 96
    assert spec.normalization == {"kind": "minmax"} and spec.n_routers == 3
    assert spec_for("resunet3d-paper").input_size == [96, 96, 96]
