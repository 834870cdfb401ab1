"""Training engine, in process: config validation, methods, schedules, resume state, pretrained init, routers."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from napari_dmoe.io.checkpoint import load_model, read_spec
from napari_dmoe.model import build_network, make_spec
from napari_dmoe.model.moe import DMoE
from napari_dmoe.training.config import ConfigError, load_config
from napari_dmoe.training.optim import resolve_recipe
from napari_dmoe.training.engine import TrainingError, train
from napari_dmoe.training.optim import lr_schedule
from napari_dmoe.training.pretrained import InitError, load_pretrained_vit, set_trainable
from napari_dmoe.model.routers import fallback_routers, fallback_table
from training_data import tiny_config, write_fairseg, write_folder


@pytest.fixture
def fairseg(tmp_path):
    return write_fairseg(tmp_path / "fairseg")


def _config(tmp_path, data_root, **kw):
    return tiny_config(tmp_path / "c.yaml", tmp_path / "run",
                       {"format": "fairseg", "root": str(data_root), "attributes": "race", "crop": None}, **kw)


# -- config ------------------------------------------------------------------------------------------------
def test_config_defaults_and_overrides(tmp_path, fairseg):
    cfg = load_config(_config(tmp_path, fairseg), ["recipe.lr=0.02", "augment.flip=false", "model.top_k=1"])
    assert cfg["recipe"]["lr"] == 0.02 and cfg["augment"]["flip"] is False and cfg["model"]["top_k"] == 1
    assert cfg["seed"] == 1234
    assert cfg["data"]["attributes"] == [{"name": "race", "values": ["Asian", "Black", "White"]}]
    recipe = resolve_recipe(load_config(_config(tmp_path, fairseg)), total_steps=10)
    assert recipe["optimizer"] == "sgd" and recipe["lr"] == pytest.approx(0.01 * 4 / 24)
    assert recipe["momentum"] == 0.9 and recipe["weight_decay"] == 1e-4


@pytest.mark.parametrize("override, message", [
    ("recipe.lr=fast", "config key 'recipe.lr': expected a number, got 'fast'"),
    ("recipe.batchsize=3", "config key 'recipe.batchsize' is not known"),
    ("method=dmoe2", "config key 'method': 'dmoe2' is not one of"),
    ("data.root=/no/such/folder", "config key 'data.root': folder /no/such/folder not found"),
    ("model.init_from=missing.npz", "config key 'model.init_from': file"),
    ("recipe.amp=3", "config key 'recipe.amp': expected true or false, got 3"),
    ("data.attributes=[skin]", "config key 'data.attributes.skin': no default vocabulary"),
])
def test_config_errors_name_the_key(tmp_path, fairseg, override, message):
    with pytest.raises(ConfigError) as err:
        load_config(_config(tmp_path, fairseg), [override])
    assert message in str(err.value)


def test_config_missing_required_key(tmp_path, fairseg):
    path = _config(tmp_path, fairseg)
    raw = yaml.safe_load(path.read_text())
    del raw["model"]["preset"]
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="config key 'model.preset' is required"):
        load_config(path)


# -- schedules -------------------------------------------------------------------------------------------------
def test_poly_and_warmup_cosine_schedules():
    poly = lr_schedule({"warmup_steps": 0, "poly_power": 0.9, "schedule": "poly"}, total=10)
    assert poly(0) == 1.0 and poly(5) == pytest.approx(0.5 ** 0.9) and poly(10) == 0.0
    cos = lr_schedule({"warmup_steps": 2, "poly_power": 0.9, "schedule": "warmup_cosine"}, total=12)
    assert cos(0) == 0.5 and cos(1) == 1.0 and cos(7) == pytest.approx(0.5) and cos(12) == pytest.approx(0.0)


# -- methods -> routing, in a real (tiny) run -----------------------------------------------------------------
@pytest.mark.parametrize("method, routing, loss", [("baseline", "none", "dice_ce"), ("moe", "moe", "dice_ce"),
                                                   ("dmoe", "dmoe", "dice_ce"), ("febs", "none", "febs"),
                                                   ("dmoe+febs", "dmoe", "febs")])
def test_methods_build_the_right_routing(tmp_path, fairseg, method, routing, loss):
    cfg = load_config(_config(tmp_path, fairseg, method=method), ["recipe.steps=1", "recipe.val_every=1"])
    best = train(cfg, quiet=True, device="cpu")
    model = load_model(best)
    spec = model.spec
    assert spec.routing == routing and spec.provenance["loss"] == loss and spec.provenance["method"] == method
    layers = [m for m in model.network.modules() if isinstance(m, DMoE)]
    assert len(layers) == (0 if routing == "none" else 1)
    if layers:
        assert layers[0].n_attr == (3 if routing == "dmoe" else 1)
    assert spec.provenance["data"]["train"]["n"] + spec.provenance["data"]["val"]["n"] == 12
    assert set(spec.metrics["groups"]) <= {"Asian", "Black", "White"}


def test_batch_larger_than_data_is_a_clear_error(tmp_path, fairseg):
    cfg = load_config(_config(tmp_path, fairseg), ["recipe.batch_size=64"])
    with pytest.raises(TrainingError, match="fewer than recipe.batch_size=64"):
        train(cfg, quiet=True, device="cpu")


def test_events_file_and_intersectional_model(tmp_path):
    root = write_folder(tmp_path / "folder")
    data = {"format": "folder", "root": str(root), "split_column": "split", "class_names": ["background", "disc"],
            "attributes": {"sex": ["F", "M"], "site": ["a", "b"]}}
    # add a second attribute column: site b on every fourth row
    rows = (root / "dataset.csv").read_text().splitlines()
    out = [rows[0] + ",site"]
    for i, row in enumerate(rows[1:]):
        out.append(row + ("," + ("b" if i % 4 == 3 else "a")))
    (root / "dataset.csv").write_text("\n".join(out) + "\n")
    cfg = load_config(tiny_config(tmp_path / "c.yaml", tmp_path / "run", data), ["fallback_min_cases=2"])
    events = tmp_path / "events.jsonl"
    best = train(cfg, events=events, quiet=True, device="cpu")
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    kinds = [e["event"] for e in lines]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("step") == 4 and "val" in kinds
    step = next(e for e in lines if e["event"] == "step")
    assert {"step", "epoch", "loss", "lr", "throughput", "eta_s"} <= set(step) and math.isfinite(step["loss"])
    spec = read_spec(best)
    assert spec.n_routers == 4 and [a.name for a in spec.attributes] == ["sex", "site"]
    counts = spec.provenance["router_counts"]
    # training split = rows 0-6 (7, 8 are val): sex alternates F/M, site b on row 3 only
    assert counts == {"F/a": 4, "F/b": 0, "M/a": 2, "M/b": 1}
    # too rare (< 2 cases): fall back to the trained routers with the same first value (sex)
    assert fallback_routers(spec, spec.router_index(["F", "b"])) == [spec.router_index(["F", "a"])]
    assert fallback_routers(spec, spec.router_index(["M", "b"])) == [spec.router_index(["M", "a"])]
    assert fallback_routers(spec, spec.router_index(["M", "a"])) == [spec.router_index(["M", "a"])]


def test_fallback_table_without_same_first_value():
    spec = make_spec("transunet2d-tiny", "race", ["A", "B"], ["bg", "fg"])
    table = fallback_table(spec, {"A": 10, "B": 0}, min_cases=5)
    assert table == {"min_cases": 5, "routers": {"1": [0]}}


# -- pretrained ViT --------------------------------------------------------------------------------------------
def _tiny_net():
    spec = make_spec("transunet2d-tiny", "race", ["A", "B"], ["bg", "fg"], img_size=32)
    return build_network(spec)


def test_timm_safetensors_init(tmp_path):
    net = _tiny_net()
    hidden, mlp, g = 32, 64, torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    sd = {"patch_embed.proj.weight": r(hidden, 3, 16, 16), "patch_embed.proj.bias": r(hidden),
          "pos_embed": r(1, 1 + 16, hidden), "cls_token": r(1, 1, hidden), "norm.weight": r(hidden),
          "norm.bias": r(hidden)}
    for i in range(3):  # one more block than the network has: ignored
        p = f"blocks.{i}."
        sd.update({p + "norm1.weight": r(hidden), p + "norm1.bias": r(hidden), p + "norm2.weight": r(hidden),
                   p + "norm2.bias": r(hidden), p + "attn.qkv.weight": r(3 * hidden, hidden),
                   p + "attn.qkv.bias": r(3 * hidden), p + "attn.proj.weight": r(hidden, hidden),
                   p + "attn.proj.bias": r(hidden), p + "mlp.fc1.weight": r(mlp, hidden), p + "mlp.fc1.bias": r(mlp),
                   p + "mlp.fc2.weight": r(hidden, mlp), p + "mlp.fc2.bias": r(hidden)})
    path = tmp_path / "vit.safetensors"
    save_file(sd, str(path))
    info = load_pretrained_vit(net, path)
    ours = net.state_dict()
    key = sd["blocks.1.attn.qkv.weight"][hidden:2 * hidden]
    assert torch.equal(ours["transformer.encoder.layer.1.attn.key.weight"], key)
    assert torch.equal(ours["transformer.encoder.layer.0.ffn.fc2.bias"], sd["blocks.0.mlp.fc2.bias"])
    # 4x4 pretrained grid resized to this network's 2x2 grid, class token dropped
    assert ours["transformer.embeddings.position_embeddings"].shape == (1, 4, hidden)
    assert info["tensors_skipped"] == 16  # block 2: 8 norm/mlp + 2 out + 6 q/k/v tensors


def test_google_npz_init_and_shape_error(tmp_path):
    net = _tiny_net()
    hidden, heads, mlp = 32, 2, 64
    rng = np.random.default_rng(0)
    r = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
    arrays = {"embedding/kernel": r(16, 16, 3, hidden), "embedding/bias": r(hidden),
              "Transformer/posembed_input/pos_embedding": r(1, 5, hidden),
              "Transformer/encoder_norm/scale": r(hidden), "Transformer/encoder_norm/bias": r(hidden)}
    for i in range(2):
        p = f"Transformer/encoderblock_{i}/"
        for ln in ("LayerNorm_0", "LayerNorm_2"):
            arrays[p + ln + "/scale"], arrays[p + ln + "/bias"] = r(hidden), r(hidden)
        arrays[p + "MlpBlock_3/Dense_0/kernel"], arrays[p + "MlpBlock_3/Dense_0/bias"] = r(hidden, mlp), r(mlp)
        arrays[p + "MlpBlock_3/Dense_1/kernel"], arrays[p + "MlpBlock_3/Dense_1/bias"] = r(mlp, hidden), r(hidden)
        a = p + "MultiHeadDotProductAttention_1/"
        for name in ("query", "key", "value"):
            arrays[a + name + "/kernel"], arrays[a + name + "/bias"] = r(hidden, heads, 16), r(heads, 16)
        arrays[a + "out/kernel"], arrays[a + "out/bias"] = r(heads, 16, hidden), r(hidden)
    path = tmp_path / "ViT-B_16.npz"
    np.savez(path, **arrays)
    load_pretrained_vit(net, path)
    ours = net.state_dict()
    q = arrays["Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel"].reshape(hidden, hidden).T
    assert np.array_equal(ours["transformer.encoder.layer.1.attn.query.weight"].numpy(), q)
    conv = arrays["embedding/kernel"].transpose(3, 2, 0, 1)
    assert np.array_equal(ours["transformer.embeddings.patch_embeddings.weight"].numpy(), conv)
    arrays["embedding/kernel"] = r(16, 16, 3, 48)
    np.savez(path, **arrays)
    with pytest.raises(InitError, match="has shape"):
        load_pretrained_vit(_tiny_net(), path)


def test_trainable_routers_experts_freezes_the_rest():
    net = _tiny_net()
    n = set_trainable(net, "routers_experts")
    moe = sum(p.numel() for m in net.modules() if isinstance(m, DMoE) for p in m.parameters())
    assert n == moe and not net.segmentation_head.weight.requires_grad


def test_aux_loss_covers_every_block_of_a_shared_dmoe_and_resets_per_step(tmp_path, fairseg, monkeypatch):
    from napari_dmoe.training import engine

    net = _tiny_net()
    shared = [m for m in net.modules() if isinstance(m, DMoE)]
    assert len(shared) == 1  # one dMoE instance called by both blocks
    shared[0].aux_loss_enabled = True
    net(torch.randn(2, 1, 32, 32), torch.tensor([0, 1]))
    terms = list(shared[0].aux_losses)
    assert len(terms) == 2  # depth 2
    torch.testing.assert_close(engine.moe_penalties(net, 0.05, 0.0), 0.05 * torch.stack(terms).mean())
    engine.reset_moe_losses(net)
    assert engine.moe_penalties(net, 0.05, 0.0) == 0.0

    seen = []
    original = engine.moe_penalties

    def counting(network, aux_weight, smoothing):
        seen.append(sum(len(m.aux_losses) for m in network.modules() if isinstance(m, DMoE)))
        return original(network, aux_weight, smoothing)

    monkeypatch.setattr(engine, "moe_penalties", counting)
    best = train(load_config(_config(tmp_path, fairseg), ["aux_loss=0.05"]), quiet=True)
    # Every step sees exactly the 2 terms of its own forward: validation forwards (steps 2, 4) and earlier
    # steps never leak into the next step's loss.
    assert seen == [2, 2, 2, 2]
    assert read_spec(best).provenance["config"]["aux_loss"] == 0.05


# -- resume state, in process ----------------------------------------------------------------------------------
def test_resume_after_interrupt_is_bit_exact(tmp_path, fairseg, monkeypatch):
    cfg = load_config(_config(tmp_path, fairseg), ["recipe.steps=4", "recipe.checkpoint_every=2"])
    train({**cfg, "output_dir": str(tmp_path / "full")}, quiet=True, device="cpu")

    from napari_dmoe.training import engine

    original = engine.resume_state.save_state

    def save_then_die(*args, **kwargs):
        original(*args, **kwargs)
        raise KeyboardInterrupt  # interrupted right after the first checkpoint

    monkeypatch.setattr(engine.resume_state, "save_state", save_then_die)
    part = {**cfg, "output_dir": str(tmp_path / "part")}
    with pytest.raises(KeyboardInterrupt):
        train(part, quiet=True, device="cpu")
    monkeypatch.setattr(engine.resume_state, "save_state", original)
    assert json.loads((tmp_path / "part" / "resume.json").read_text())["step"] == 2
    with pytest.raises(TrainingError, match="no resume state"):
        train({**part, "output_dir": str(tmp_path / "empty")}, quiet=True, device="cpu", require_resume=True)
    train(part, quiet=True, device="cpu", require_resume=True)
    a = load_file(str(tmp_path / "full" / "last.safetensors"))
    b = load_file(str(tmp_path / "part" / "last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    changed = {**part, "method": "moe"}
    with pytest.raises(TrainingError, match="different data/model/method"):
        train(changed, quiet=True, device="cpu")


def test_every_recipe_in_training_folder_validates(tmp_path):
    from pathlib import Path

    recipes = sorted((Path(__file__).parents[1] / "training").glob("*.yaml"))
    demo = [p for p in recipes if p.stem.startswith(("demo-", "robust-"))]  # robust-: issue 26's study recipe
    assert len(recipes) - len(demo) == 30  # 6 datasets x 5 methods
    assert {p.stem.split("-")[1] for p in demo} >= {"fundus", "prostate"}  # the demo models' recipes
    for path in recipes:
        cfg = load_config(path, [f"data.root={tmp_path}"])
        method = path.stem.rsplit("-", 1)[-1] if "dmoe+febs" not in path.stem else "dmoe+febs"
        assert cfg["method"] == method and cfg["name"] == path.stem


def test_inference_uses_the_router_fallback():
    from napari_dmoe.model.routers import resolve_routers

    spec = make_spec("transunet2d-tiny", "race", ["A", "B", "C"], ["bg", "fg"])
    spec.provenance = {"router_fallback": fallback_table(spec, {"A": 9, "B": 1, "C": 7}, min_cases=5)}
    routers, used, note = resolve_routers(spec, "B")
    assert routers == [0, 2] and used == {"race": "B"} and "race=B had too few training cases" in note
    assert resolve_routers(spec, "C")[0] == [2]
