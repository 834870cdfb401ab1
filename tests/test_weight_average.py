"""Issue 26's third round: a moving average of the weights (``recipe.ema`` -> ema.safetensors) and router
smoothing (the routers' spread about their mean in the loss)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from napari_dmoe.io.checkpoint import load_model
from napari_dmoe.model.moe import DMoE, dmoe_layers
from napari_dmoe.training.config import ConfigError, load_config
from napari_dmoe.training.engine import train
from napari_dmoe.training.losses import moe_penalties, router_spread
from training_data import tiny_config, write_fairseg


def _config(tmp_path: Path, *overrides: str, **sections: dict) -> dict:
    root = tmp_path / "fairseg"
    if not root.is_dir():
        write_fairseg(root, n_train=24, n_test=4)
    data = {"format": "fairseg", "root": str(root), "attributes": "race", "crop": None}
    return load_config(tiny_config(tmp_path / "c.yaml", tmp_path / "run", data, **sections), list(overrides))


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def test_the_average_is_written_validated_and_follows_its_decay(tmp_path: Path) -> None:
    runs = {}
    for decay in ("1e-9", "0.9"):
        cfg = _config(tmp_path, f"recipe.ema={decay}", "recipe.steps=6", f"output_dir={tmp_path / decay}")
        train(cfg, events=tmp_path / f"{decay}.jsonl", quiet=True, device="cpu")
        runs[decay] = tmp_path / decay
    last, near = _weights(runs["1e-9"] / "last.safetensors"), _weights(runs["1e-9"] / "ema.safetensors")
    floats = [k for k in last if last[k].is_floating_point()]
    # a decay of ~0 averages nothing: the average is the last step's weights
    assert all(torch.allclose(last[k], near[k], atol=1e-6) for k in floats)
    last, avg = _weights(runs["0.9"] / "last.safetensors"), _weights(runs["0.9"] / "ema.safetensors")
    assert _weights(runs["1e-9"] / "last.safetensors").keys() == avg.keys()  # the same training run, same seed
    assert any(not torch.allclose(last[k], avg[k]) for k in floats)  # 0.9 remembers the earlier steps
    model = load_model(runs["0.9"] / "ema.safetensors")  # a model file like any other: it loads and segments
    assert model.spec.provenance["ema"] == {"decay": 0.9, "from_step": 0}
    assert model.spec.metrics["split"] == "val" and model.spec.metrics["step"] == 6
    assert "features" in model.spec.trained_on  # its own fit-check record, from its own weights
    own = load_model(runs["0.9"] / "last.safetensors").spec.trained_on["features"]
    assert model.spec.trained_on["features"] != own
    events = [json.loads(line) for line in (tmp_path / "0.9.jsonl").read_text().splitlines()]
    saved = [e for e in events if e.get("ema")]
    assert len(saved) == 1 and saved[0]["path"].endswith("ema.safetensors") and saved[0]["es_dice"] is not None


def test_no_average_file_without_the_option(tmp_path: Path) -> None:
    train(_config(tmp_path), quiet=True, device="cpu")
    assert (tmp_path / "run" / "best.safetensors").is_file() and not (tmp_path / "run" / "ema.safetensors").exists()


def test_a_resumed_run_averages_what_an_unbroken_one_does(tmp_path: Path, monkeypatch) -> None:
    from napari_dmoe.training import engine

    cfg = _config(tmp_path, "recipe.ema=0.8", "recipe.checkpoint_every=2")
    train({**cfg, "output_dir": str(tmp_path / "full")}, quiet=True, device="cpu")
    original = engine.resume_state.save_state

    def save_then_die(*args, **kwargs):
        original(*args, **kwargs)
        raise KeyboardInterrupt  # killed right after the first checkpoint (step 2 of 4)

    monkeypatch.setattr(engine.resume_state, "save_state", save_then_die)
    part = {**cfg, "output_dir": str(tmp_path / "part")}
    with pytest.raises(KeyboardInterrupt):
        train(part, quiet=True, device="cpu")
    monkeypatch.setattr(engine.resume_state, "save_state", original)
    assert "ema.n_averaged" in _weights(tmp_path / "part" / "resume.safetensors")
    train(part, quiet=True, device="cpu", require_resume=True)
    a, b = _weights(tmp_path / "full" / "ema.safetensors"), _weights(tmp_path / "part" / "ema.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert load_model(tmp_path / "part" / "ema.safetensors").spec.provenance["ema"]["from_step"] == 0


def test_the_average_option_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="recipe.ema"):
        _config(tmp_path, "recipe.ema=1")
    with pytest.raises(ConfigError, match="recipe.ema.*group-local"):
        _config(tmp_path, "recipe.ema=0.99", "trainable=group_local")
    with pytest.raises(ConfigError, match="router_smoothing"):
        _config(tmp_path, "router_smoothing=-1")


def _layer(n_attr: int = 3) -> DMoE:
    torch.manual_seed(0)
    return DMoE(dim=8, n_attr=n_attr, n_experts=4, top_k=2)


def test_router_spread_is_the_mean_squared_distance_from_the_routers_mean() -> None:
    layer = _layer()
    gates = torch.stack([torch.cat([r.gate.weight.flatten(), r.gate.bias]) for r in layer.routers]).detach()
    expected = ((gates - gates.mean(0)) ** 2).sum(1).mean()
    assert torch.allclose(router_spread(layer), expected)
    for r in layer.routers[1:]:  # identical routers: nothing to smooth
        r.gate.load_state_dict(layer.routers[0].gate.state_dict())
    assert float(router_spread(layer).detach()) == pytest.approx(0.0, abs=1e-12)
    assert router_spread(_layer(n_attr=1)) is None  # plain MoE: one router, no term
    assert router_spread(torch.nn.Linear(2, 2)) is None


def test_smoothing_pulls_each_router_towards_the_mean() -> None:
    layer = _layer()
    before = torch.stack([r.gate.weight.detach().clone() for r in layer.routers])
    moe_penalties(layer, aux_weight=0.0, smoothing=0.5).backward()
    grads = torch.stack([r.gate.weight.grad for r in layer.routers])
    # d/dW_r of 0.5 * mean_r |W_r - mean|^2 = 0.5 * 2 / R * (W_r - mean): a step against it shrinks the spread
    assert torch.allclose(grads, 0.5 * 2 / 3 * (before - before.mean(0)), atol=1e-6)
    with torch.no_grad():
        for r, g in zip(layer.routers, grads):
            r.gate.weight -= 0.5 * g
    after = torch.stack([r.gate.weight.detach() for r in layer.routers])
    assert ((after - after.mean(0)) ** 2).sum() < ((before - before.mean(0)) ** 2).sum()
    assert moe_penalties(layer, 0.0, 0.0) == 0.0  # both off: nothing is added to the loss


def test_a_smoothed_run_ends_with_closer_routers(tmp_path: Path) -> None:
    spreads = {}
    for weight in ("0", "1"):
        cfg = _config(tmp_path, f"router_smoothing={weight}", "recipe.lr=0.3", f"output_dir={tmp_path / weight}")
        train(cfg, quiet=True, device="cpu")
        network = load_model(tmp_path / weight / "last.safetensors").network
        spreads[weight] = float(sum(router_spread(layer).detach() for layer in dmoe_layers(network)))
    assert spreads["1"] < 0.5 * spreads["0"]
