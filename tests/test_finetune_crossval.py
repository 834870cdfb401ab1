"""Group-local fine-tune with k-fold cross-validation (training/crossval.py): the choice is deterministic for a seed,
the estimate comes from cases that did not train their fold, the other groups stay bitwise (2D engine, 3D network),
and the attribute "unknown" averages every group's answer, the adapted group's new one included (documented)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_dmoe.io.checkpoint import load_model, save_model
from napari_dmoe.model import build_network, make_spec
from napari_dmoe.training import crossval
from napari_dmoe.training.config import ConfigError, load_config
from napari_dmoe.training.engine import train

from test_finetune_local import _folder
from training_data import tiny_config

CV = {"folds": 3, "steps": [2, 4]}
RECIPE = {"steps": 4, "batch_size": 2, "lr": 0.01, "optimizer": "adamw", "weight_decay": 0.0, "poly_power": 0.0,
          "warmup_steps": 1}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cv-base")
    return train(load_config(tiny_config(tmp / "base.yaml", tmp / "base", _folder(tmp / "a"))), quiet=True,
                 device="cpu")


def _finetune(tmp_path, base, name: str, events: bool = False):
    cfg = load_config(tiny_config(tmp_path / f"{name}.yaml", tmp_path / name, _folder(tmp_path / "data", "M"),
                                  model={"base_model": str(base)}, recipe=RECIPE, crossval=CV),
                      ["trainable=group_local"])
    log = tmp_path / f"{name}.events.jsonl"
    best = train(cfg, quiet=True, device="cpu", events=str(log) if events else None)
    return best, log


def test_fold_assignment_holds_every_case_out_once_and_is_seeded():
    folds = crossval.fold_of(10, 5, seed=3)
    assert sorted(folds) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert folds == crossval.fold_of(10, 5, seed=3) and folds != crossval.fold_of(10, 5, seed=4)
    assert crossval.fold_of(3, 5, seed=0).count(0) == 1  # never more folds than cases


def test_the_base_is_kept_unless_a_step_count_gains_and_ties_go_to_fewer_steps():
    assert crossval._best({0: 0.0, 10: 0.01, 20: 0.01}) == 10
    assert crossval._best({0: 0.0, 10: -0.1, 20: 0.0}) == 0  # no gain on average: the base
    assert crossval._best({10: -0.1, 20: -0.05}) == 20  # keep_base false: the best trained step count


def test_crossval_config_is_checked(tmp_path):
    for bad in ("crossval.folds=1", "crossval.steps=[10, -1]"):
        with pytest.raises(ConfigError, match="crossval"):
            load_config(tiny_config(tmp_path / "c.yaml", tmp_path / "o", _folder(tmp_path)), [bad])


@pytest.mark.slow
def test_crossval_choice_is_deterministic_and_the_estimate_uses_held_out_cases(tmp_path, base, monkeypatch):
    seen = []
    real = crossval._fit_fold

    def spy(run, network, train_idx, eval_items, *args, **kwargs):
        trained = {str(run.train_items.ds.records[i].id) for i in train_idx}
        held = {str(r.id) for r in eval_items.ds.records}
        scores = real(run, network, train_idx, eval_items, *args, **kwargs)
        seen.append((trained, held, {s: set(d) for s, d in scores.items()}))
        return scores

    monkeypatch.setattr(crossval, "_fit_fold", spy)
    best1, log = _finetune(tmp_path, base, "one", events=True)
    first = load_model(best1).spec.provenance["selection"]
    # every fold: scored only on cases it did not train on; every case held out exactly once
    all_ids = set().union(*[t | h for t, h, _ in seen])
    assert len(seen) == 3 and len(all_ids) == first["cases"]
    for trained, held, scored in seen:
        assert not trained & held and trained | held == all_ids
        assert all(ids == held for ids in scored.values())
    assert sorted(i for _, h, _ in seen for i in h) == sorted(all_ids)

    best2, _ = _finetune(tmp_path, base, "two")
    second = load_model(best2).spec.provenance["selection"]
    assert first == second  # same seed: same folds, same scores, same choice, same estimate
    a, b = load_model(best1).network.state_dict(), load_model(best2).network.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

    assert first["steps"] in first["candidates"] and 0 in first["candidates"]
    chosen = first["steps"]
    assert first["mean_gain"][str(chosen)] == max(first["mean_gain"].values())
    estimate = first["estimate"]
    assert set(estimate["groups"]) == {"M"} and len(estimate["fold_gains"]) == 3
    assert "did not train on it" in estimate["measured_on"]
    # the nested estimate: each fold at the step count the other folds chose
    for f, s_f in enumerate(estimate["fold_steps"]):
        assert estimate["fold_gains"][f] == pytest.approx(first["fold_gain"][str(s_f)][f])
    events = [json.loads(line) for line in log.read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds.index("crossval") < kinds.index("selection") < kinds.index("start")
    done = next(e for e in events if e["event"] == "done")
    assert done["best_step"] == chosen

    from napari_dmoe.finetune.run_state import RunState

    state = RunState()
    for e in events:
        state.apply(e)
    cv_total = 3 * max(CV["steps"])
    assert state.selection["steps"] == chosen and state.total_steps == cv_total + chosen
    assert state.step == cv_total + chosen and state.done


@pytest.mark.slow
def test_crossval_finetune_keeps_other_groups_bitwise_and_unknown_averages_every_group(tmp_path, base):
    from napari_dmoe.finetune.compare import unknown_row
    from napari_dmoe.inference.engine import segment

    best, _ = _finetune(tmp_path, base, "ft")
    tuned, old = load_model(best), load_model(base)
    image = np.random.default_rng(0).normal(100, 30, (32, 32)).astype(np.float32)
    assert np.array_equal(segment(tuned, image, "F").probabilities, segment(old, image, "F").probabilities)
    # "unknown" on a model that surely changed (no cross-validation that might keep the base)
    cfg = load_config(tiny_config(tmp_path / "u.yaml", tmp_path / "u", _folder(tmp_path / "data", "M"),
                                  model={"base_model": str(base)},
                                  recipe={**RECIPE, "lr": 0.05, "val_every": 4}), ["trainable=group_local"])
    tuned = load_model(train(cfg, quiet=True, device="cpu"))
    assert not np.array_equal(segment(tuned, image, "M").probabilities, segment(old, image, "M").probabilities)
    # "unknown": the mean of every group's answer of THIS model (the documented behaviour), so it moves by the
    # adapted group's share; the base's unknown answer is the mean of the base's answers
    groups = [segment(tuned, image, g).probabilities for g in ("F", "M")]
    unknown = segment(tuned, image, "unknown").probabilities
    np.testing.assert_allclose(unknown, np.mean(groups, axis=0), atol=5e-4)  # float16 probabilities
    assert not np.array_equal(unknown, segment(old, image, "unknown").probabilities)
    from napari_dmoe.evaluation.loop import Case

    row = unknown_row(old, tuned, [Case("x", "F", image, np.zeros((32, 32), np.uint8), {"sex": "F"})])
    assert row["group"] == "unknown" and "adapted ones included" in row["source"] and row["agreement_n"] == 1


def test_3d_group_local_with_adam_keeps_other_stages_bitwise(tmp_path):
    """The recipe's optimiser (AdamW, the fine-tune's weight decay 0) touches only the adapted stage's weights."""
    from napari_dmoe.training.optim import make_optimizer
    from napari_dmoe.training.local import prepare_group_local, set_train_mode

    torch.manual_seed(0)
    spec = make_spec("resunet3d-tiny", "stage", ["T1", "T2", "T3", "T4"], ["background", "CTV"], n_experts=4)
    net = build_network(spec).eval()
    x = torch.randn(2, 1, 64, 64, 64)
    others, t4 = torch.tensor([0, 2]), torch.tensor([3, 3])
    with torch.no_grad():
        before, before_t4 = net(x, others), net(x, t4)
    items = [{"image": torch.randn(1, 64, 64, 64), "label": (torch.rand(64, 64, 64) > 0.7).long(), "attr": 3}]
    prepare_group_local(net, spec, [3], items, n_local=1)
    set_train_mode(net, "group_local")
    opt = make_optimizer([p for p in net.parameters() if p.requires_grad],
                     {"optimizer": "adamw", "lr": 0.05, "weight_decay": 0.0})
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(net(items[0]["image"][None], torch.tensor([3])),
                                                 items[0]["label"][None])
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = save_model(tmp_path / "t.safetensors", net.eval(), spec)
    with torch.no_grad():
        assert torch.equal(load_model(path).network(x, others), before)  # T1 and T3: bit for bit, after save/load
        assert not torch.equal(load_model(path).network(x, t4), before_t4)  # T4 learned
