"""Group-local fine-tuning: the adapted group changes, every other group stays bit for bit (2D engine, 3D model)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_dmoe.io.checkpoint import load_model, save_model
from napari_dmoe.model import build_network, make_spec
from napari_dmoe.model.moe import dmoe_layers, local_expert_table
from napari_dmoe.training.config import ConfigError, load_config
from napari_dmoe.training.engine import train
from napari_dmoe.training.local import adapted_routers, prepare_group_local, set_train_mode

from training_data import tiny_config, write_folder


def _folder(tmp_path, keep_train: str | None = None):
    """write_folder data (sex F/M); ``keep_train``: only that group's rows stay in the train/val splits."""
    root = write_folder(tmp_path / "folder", n=16)
    if keep_train:
        rows = (root / "dataset.csv").read_text().splitlines()
        kept = [r for r in rows[1:] if r.split(",")[2] == keep_train or r.endswith(",test")]
        (root / "dataset.csv").write_text("\n".join([rows[0], *kept]) + "\n")
    return {"format": "folder", "root": str(root), "split_column": "split", "class_names": ["background", "disc"],
            "attributes": {"sex": ["F", "M"]}}


def _outputs(path, x, attr):
    model = load_model(path)
    with torch.no_grad():
        return model.network(x, torch.tensor(attr)), model


@pytest.mark.slow
def test_group_local_finetune_leaves_the_other_group_bitwise(tmp_path):
    base_cfg = load_config(tiny_config(tmp_path / "base.yaml", tmp_path / "base", _folder(tmp_path / "a")))
    base = train(base_cfg, quiet=True, device="cpu")
    data = _folder(tmp_path / "b", keep_train="M")
    cfg = load_config(tiny_config(tmp_path / "ft.yaml", tmp_path / "ft", data, model={"base_model": str(base)},
                                  recipe={"steps": 4, "batch_size": 2, "val_every": 2, "lr": 0.05}),
                      ["trainable=group_local"])
    tuned = train(cfg, quiet=True, device="cpu")

    x = torch.randn(4, 1, 32, 32)
    before_f, base_model = _outputs(base, x, [0, 0, 0, 0])
    after_f, model = _outputs(tuned, x, [0, 0, 0, 0])
    assert torch.equal(before_f, after_f)  # group F: not adapted, bitwise identical
    before_m, _ = _outputs(base, x, [1, 1, 1, 1])
    after_m, _ = _outputs(tuned, x, [1, 1, 1, 1])
    assert not torch.equal(before_m, after_m)  # group M learned something

    # through the inference engine too: F is still answered by F's own router (the fallback table counts the base
    # model's cases, so the groups the fine-tune had no case of are not taken for untrained)
    from napari_dmoe.inference.engine import segment

    assert model.spec.provenance["router_fallback"]["routers"] == {}
    assert model.spec.provenance["router_counts"]["M"] > base_model.spec.provenance["router_counts"]["M"]
    image = x[0, 0].numpy()
    assert np.array_equal(segment(model, image, "F").probabilities, segment(base_model, image, "F").probabilities)

    # every tensor but M's router and M's local experts is the base's: shared weights AND BatchNorm statistics
    old, new = base_model.network.state_dict(), model.network.state_dict()
    changed = {k for k in old if not torch.equal(old[k], new[k])}
    assert changed and all(".routers.1." in k for k in changed), changed
    assert any("running_mean" in k for k in old)  # the tiny TransUNet has BatchNorm layers
    added = set(new) - set(old)
    assert added and all(".local_experts." in k for k in added)
    assert [[r for r, _ in layer] for layer in model.spec.local_experts] == [[1]]  # one copy, for router M
    adaptation = model.spec.provenance["adaptation"]
    assert adaptation["mode"] == "group_local" and adaptation["groups"] == ["M"]

    # dmoe info prints the adaptation
    from napari_dmoe.cli.info import format_spec

    text = format_spec(model.spec)
    assert "adapted: M (group_local" in text and "bitwise unchanged: F" in text


def test_group_local_refuses_groups_it_would_not_learn(tmp_path):
    spec = make_spec("transunet2d-tiny", "race", ["Asian", "Black", "White"], ["bg", "fg"])
    assert adapted_routers(spec, None, {"Asian": 0, "Black": 3, "White": 0}) == [1]
    assert adapted_routers(spec, ["Black", "Asian"], {"Black": 3}) == [0, 1]
    with pytest.raises(ConfigError, match="White"):
        adapted_routers(spec, ["Black"], {"Black": 3, "White": 2})
    with pytest.raises(ConfigError, match="not groups"):
        adapted_routers(spec, ["Purple"], {"Black": 3})
    with pytest.raises(ConfigError, match="not one of"):
        load_config(tiny_config(tmp_path / "c.yaml", tmp_path / "o", _folder(tmp_path)), ["trainable=local"])


def _train_steps(net, routers, items, steps=3):
    set_train_mode(net, "group_local")
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5)
    for _ in range(steps):
        for item in items:
            x, y = torch.as_tensor(item["image"])[None], torch.as_tensor(item["label"])[None]
            loss = torch.nn.functional.cross_entropy(net(x, torch.tensor([item["attr"]])), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()


def test_3d_stage_local_adaptation_is_bitwise_local_after_save_and_load(tmp_path):
    torch.manual_seed(0)
    spec = make_spec("resunet3d-tiny", "stage", ["T1", "T2", "T3", "T4"], ["background", "CTV"], n_experts=4)
    net = build_network(spec).eval()
    base_path = save_model(tmp_path / "base.safetensors", net, spec)
    x = torch.randn(4, 1, 64, 64, 64)
    others = torch.tensor([0, 1, 3, 0])
    with torch.no_grad():
        before_others, before_t3 = net(x, others), net(x, torch.tensor([2, 2, 2, 2]))
    items = [{"image": torch.randn(1, 64, 64, 64), "label": (torch.rand(64, 64, 64) > 0.7).long(), "attr": 2}
             for _ in range(2)]
    record = prepare_group_local(net, spec, [2], items, n_local=2)
    assert record["groups"] == ["T3"] and len(dmoe_layers(net)) == 5
    assert all(len(layer.local_table) == 2 for layer in dmoe_layers(net))
    with torch.no_grad():  # the copies start equal to the shared experts: the start is the base model exactly
        assert torch.equal(net(x, torch.tensor([2, 2, 2, 2])), before_t3)
    _train_steps(net, [2], items)
    assert spec.local_experts == local_expert_table(net)
    path = save_model(tmp_path / "tuned.safetensors", net, spec)
    for model in (net, load_model(path).network):
        with torch.no_grad():
            assert torch.equal(model(x, others), before_others)
            assert not torch.equal(model(x, torch.tensor([2, 2, 2, 2])), before_t3)
    assert load_model(base_path).spec.local_experts is None  # old-style files load as before


def test_old_model_files_without_local_experts_still_load(model_path):
    model = load_model(model_path)
    assert model.spec.local_experts is None
    assert all(layer.local_experts is None for layer in dmoe_layers(model.network))
    assert "local_experts" in json.dumps(model.spec.to_dict())


def test_intersectional_adaptation_is_local_to_the_combination():
    from napari_dmoe.model.spec import Attribute

    spec = make_spec("transunet2d-tiny", "race", ["Asian", "Black", "White"], ["bg", "fg"], n_experts=4)
    spec.attributes = [Attribute("race", ["Asian", "Black", "White"]), Attribute("sex", ["F", "M"])]
    net = build_network(spec).eval()
    counts = {"Asian/F": 0, "Asian/M": 0, "Black/F": 3, "Black/M": 0, "White/F": 0, "White/M": 0}
    routers = adapted_routers(spec, None, counts)
    assert routers == [spec.router_index(["Black", "F"])]  # the combination present, not all of Black
    x = torch.randn(6, 1, 64, 64)
    every = torch.arange(6)
    with torch.no_grad():
        before = net(x, every)
    items = [{"image": torch.randn(1, 64, 64), "label": torch.zeros(64, 64, dtype=torch.long), "attr": routers[0]}]
    prepare_group_local(net, spec, routers, items, n_local=1)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(0.5)
        after = net(x, every)
    others = [i for i in range(6) if i != routers[0]]
    assert torch.equal(after[others], before[others])  # Black/M included: same race, other sex, untouched
    assert not torch.equal(after[routers[0]], before[routers[0]])


@pytest.mark.slow
def test_a_finetune_that_beats_nothing_keeps_the_base_weights(tmp_path):
    """``recipe.validate_first`` validates the starting weights; a run none of whose steps beats them (lr 1e-12:
    nothing can; group_local keeps the norm statistics frozen too) keeps them as best.safetensors and says so in the
    done event, which the widget's run state reads."""
    base_cfg = load_config(tiny_config(tmp_path / "base.yaml", tmp_path / "base", _folder(tmp_path / "a")))
    base = train(base_cfg, quiet=True, device="cpu")
    cfg = load_config(tiny_config(tmp_path / "ft.yaml", tmp_path / "ft", _folder(tmp_path / "b"),
                                  model={"base_model": str(base)},
                                  recipe={"steps": 4, "batch_size": 2, "val_every": 2, "lr": 1e-12,
                                          "validate_first": True}), ["trainable=group_local"])
    events = tmp_path / "ft.events.jsonl"
    best = train(cfg, quiet=True, device="cpu", events=str(events))
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    vals = [e["step"] for e in lines if e["event"] == "val"]
    assert vals[0] == 0 and len(vals) == 3  # the base, then steps 2 and 4
    done = next(e for e in lines if e["event"] == "done")
    assert done["best_step"] == 0
    old, new = load_model(base).network.state_dict(), load_model(best).network.state_dict()
    assert set(old) <= set(new) and all(torch.equal(old[k], new[k]) for k in old)  # + the local experts' copies

    from napari_dmoe.finetune.run_state import RunState

    state = RunState()
    for e in lines:
        state.apply(e)
    assert state.done and state.best_step == 0
