"""Issue 26: a router every group shares, mixed into each group's (``model.router_mix``)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from napari_dmoe.io.checkpoint import load_model
from napari_dmoe.model import build_network, make_spec
from napari_dmoe.model.moe import DMoE, dmoe_layers
from napari_dmoe.model.spec import SpecError
from napari_dmoe.training.config import ConfigError, load_config
from napari_dmoe.training.engine import train
from training_data import tiny_config, write_fairseg


def _layer(mix: float) -> DMoE:
    torch.manual_seed(0)
    layer = DMoE(dim=8, n_attr=3, n_experts=4, top_k=2)
    if mix:
        layer.add_shared_router(mix)
    return layer


def test_each_group_gets_the_mix_of_its_router_and_the_shared_one() -> None:
    layer = _layer(0.4)
    x, attr = torch.randn(3, 5, 8), torch.tensor([0, 1, 2])
    gate, noise = layer.router_logits(x, attr)
    shared = layer.shared_router
    for b, r in enumerate(attr.tolist()):
        own = layer.routers[r]
        torch.testing.assert_close(gate[b], 0.6 * own.gate(x[b]) + 0.4 * shared.gate(x[b]))
        torch.testing.assert_close(noise[b], 0.6 * own.noise(x[b]) + 0.4 * shared.noise(x[b]))
    plain = _layer(0.0)  # without one: each group's own router, as before
    torch.testing.assert_close(plain.router_logits(x, attr)[0][1], plain.routers[1].gate(x[1]))
    with pytest.raises(ValueError, match="two or more routers"):
        DMoE(dim=8, n_attr=1, n_experts=4, top_k=2).add_shared_router(0.5)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        _layer(0.0).add_shared_router(1.0)


def test_the_spec_carries_the_mix_and_refuses_it_where_it_means_nothing() -> None:
    spec = make_spec("transunet2d-tiny", "race", ["A", "B", "C"], ["bg", "fg"], router_mix=0.5)
    network = build_network(spec)
    assert all(layer.router_mix == 0.5 and layer.shared_router is not None for layer in dmoe_layers(network))
    assert any(k.endswith("shared_router.gate.weight") for k in network.state_dict())
    plain = build_network(make_spec("transunet2d-tiny", "race", ["A", "B", "C"], ["bg", "fg"]))
    assert not any("shared_router" in k for k in plain.state_dict())  # old files keep their exact key set
    for bad in ({"router_mix": 1.0}, {"router_mix": -0.1}, {"router_mix": 0.5, "routing": "moe"}):
        with pytest.raises(SpecError, match="router_mix"):
            make_spec("transunet2d-tiny", "race", ["A", "B", "C"], ["bg", "fg"], **bad)


def _config(tmp_path: Path, *overrides: str) -> dict:
    root = tmp_path / "fairseg"
    if not root.is_dir():
        write_fairseg(root, n_train=24, n_test=4)
    data = {"format": "fairseg", "root": str(root), "attributes": "race", "crop": None}
    return load_config(tiny_config(tmp_path / "c.yaml", tmp_path / "run", data), list(overrides))


def test_trained_saved_and_kept_by_a_group_local_fine_tune(tmp_path: Path, capsys) -> None:
    why = "chosen on val-a and val-v \x1b[2J(issue 26)"  # the config's notes: why this recipe
    base = train(_config(tmp_path, "model.router_mix=0.5", f"output_dir={tmp_path / 'base'}", f"notes={why}"),
                 quiet=True, device="cpu")
    model = load_model(base)
    assert model.spec.router_mix == 0.5 and dmoe_layers(model.network)[0].shared_router is not None
    from napari_dmoe.cli.main import main

    assert main(["info", str(base)]) == 0  # a researcher sees it, and why the recipe was chosen, without escapes
    out = capsys.readouterr().out
    assert "a shared router mixed in at 0.5" in out
    assert "recipe notes: chosen on val-a and val-v (issue 26)" in out and "\x1b" not in out
    before = load_file(str(base))
    tuned = train(_config(tmp_path, f"model.base_model={base}", "trainable=group_local",
                          "recipe.lr=0.05", f"output_dir={tmp_path / 'tuned'}"), quiet=True, device="cpu")
    after = load_file(str(tuned))
    assert load_model(tuned).spec.router_mix == 0.5  # inherited from the base, not dropped
    shared = [k for k in before if "shared_router" in k]
    assert shared and all(torch.equal(before[k], after[k]) for k in shared)  # frozen: other groups unchanged
    with pytest.raises(ConfigError, match="router_mix.*differs from the base"):
        train(_config(tmp_path, f"model.base_model={base}", "model.router_mix=0.3",
                      f"output_dir={tmp_path / 'other'}"), quiet=True, device="cpu")
    with pytest.raises(ConfigError, match="model.router_mix"):
        _config(tmp_path, "model.router_mix=1")
    with pytest.raises(ConfigError, match="router_mix.*group-local fine-tune.*keeps the base"):
        _config(tmp_path, "model.router_mix=0.5", "trainable=group_local")
