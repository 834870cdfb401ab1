"""Choose how long to fine-tune, and estimate the gain, by k-fold cross-validation over every training case.

A fine-tune on a few corrected cases cannot afford to hold 2 of them back and pick its checkpoint there: the pick
follows the luck of those 2 cases, and so does the gain shown to the user. With ``crossval.folds = k`` the engine
instead (``select_steps``):

1. splits the training cases into k folds (seeded; every case is held out exactly once);
2. for each fold, fine-tunes a copy of the starting network on the other folds, exactly as the final run will
   (same optimiser, schedule, batch, augmentation), and scores its held-out cases at every candidate step count
   (``crossval.steps``; the schedule is the one the final run uses, so the first s steps of a fold's run are what
   a run of s steps does);
3. takes the step count with the highest mean Dice gain over all held-out cases (0 = the base model: kept unless
   some step count gains on average, or never with ``crossval.keep_base: false``; ties go to fewer steps), and the
   engine then trains on every case for it;
4. estimates the gain the user can expect with the choice made WITHOUT each fold's own scores (the step count that
   wins on the other folds; nested), so the estimate does not profit from the selection. Its spread is the
   standard deviation of the per-fold gains.

Every number is measured on the user's own cases, each scored by a model that did not train on it; the record
(``selection``, in the model's provenance and the ``selection`` event) says so.
"""
from __future__ import annotations

import copy
import math
import statistics
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from napari_dmoe.training.local import set_train_mode
from napari_dmoe.model.routers import group_name

MEASURED_ON = "your corrected cases, each scored by a model that did not train on it ({k}-fold cross-validation)"


def fold_of(n: int, k: int, seed: int) -> list[int]:
    """Fold index of each of ``n`` cases: a seeded permutation dealt round-robin into ``min(k, n)`` folds."""
    k = max(2, min(k, n))
    order = np.random.default_rng(seed).permutation(n)
    out = [0] * n
    for position, case in enumerate(order):
        out[int(case)] = position % k
    return out


def candidates(config: Mapping[str, Any]) -> list[int]:
    """Candidate step counts, 0 (the base model) always among them."""
    steps = config["crossval"]["steps"] or [config["recipe"]["steps"] or 0]
    return sorted({0, *[int(s) for s in steps]})


def _subset_ds(ds: Any, indices: Sequence[int]) -> Any:
    sub = copy.copy(ds)
    sub.records = [ds.records[i] for i in indices]
    return sub


def case_dice(network: torch.nn.Module, items: Any, spec: Any, device: torch.device, to_router: Any,
              trainable: str) -> dict[str, float]:
    """Mean foreground Dice of each case (id -> Dice) with the validation code of the engine."""
    from napari_dmoe.evaluation.metrics import mean_dice
    from napari_dmoe.training.validate import _batches, _volumes

    network.eval()
    try:
        with torch.no_grad():
            records = (_volumes(network, items, spec, device, 0.25, False) if spec.spatial_dims == 3
                       else _batches(network, items, spec, device, to_router, False))
    finally:
        set_train_mode(network, trainable)
    return {str(r.id): float(mean_dice(r)) for r in records}


def _fit_fold(run: Any, network: torch.nn.Module, train_idx: Sequence[int], eval_items: Any, steps: list[int],
              config: Mapping[str, Any], recipe: Mapping[str, Any], horizon: int, info: Any, seed: int,
              progress: Any) -> dict[int, dict[str, float]]:
    """Train a copy of ``network`` on ``train_idx`` for max(steps); per-case Dice of ``eval_items`` at each step."""
    from pathlib import Path

    from napari_dmoe.training.engine import _Loop, _step
    from napari_dmoe.training.optim import lr_schedule, make_optimizer

    net = copy.deepcopy(network)
    set_train_mode(net, config["trainable"])
    optimizer = make_optimizer([p for p in net.parameters() if p.requires_grad], recipe)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(recipe, horizon))
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    batch = max(1, min(int(config["recipe"]["batch_size"]), len(train_idx)))
    loop = _Loop(config, run, info, None, Path("."), recipe, net, net, optimizer, scheduler, scaler, use_amp=False,
                 per_rank=batch, steps_per_epoch=1, total=max(steps))  # the engine's step on this fold's copy
    torch.manual_seed(seed)
    scores: dict[int, dict[str, float]] = {}
    step, epoch, last = 0, 0, max(steps)
    while step < last:
        order = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        run.train_items.epoch = epoch
        loader = DataLoader(Subset(run.train_items, [train_idx[i] for i in order]), batch_size=batch,
                            shuffle=False, drop_last=True, num_workers=0)
        for data in loader:
            _step(loop, data)
            scheduler.step()
            step += 1
            progress()
            if step in steps:
                scores[step] = case_dice(net, eval_items, run.spec, info.device, run.to_router, config["trainable"])
            if step >= last:
                break
        epoch += 1
    return scores


def _best(gains: Mapping[int, float]) -> int:
    """The step count with the highest mean gain; 0 (the base, when allowed) unless a step count gains; ties:
    fewer steps."""
    best = min(gains)
    for s in sorted(gains):
        if gains[s] > gains[best] + 1e-12:
            best = s
    return best


def _mean(values: Sequence[float]) -> float:
    values = [v for v in values if v == v]
    return float(sum(values) / len(values)) if values else float("nan")


def select_steps(config: Mapping[str, Any], run: Any, info: Any, recipe: Mapping[str, Any], emit: Any
                 ) -> dict[str, Any]:
    """Cross-validate (module docstring); returns the ``selection`` record (``steps``: what the final run trains)."""
    from napari_dmoe.training.data import EvalItems

    seed, k_asked = int(config["seed"]), int(config["crossval"]["folds"])
    ds = run.train_items.ds
    n, steps = len(ds), candidates(config)
    if n < 2:
        raise ValueError(f"cross-validation needs at least 2 training cases, the training split has {n}; add "
                         "cases or set crossval.folds: 0")
    folds = fold_of(n, k_asked, seed)
    k = max(folds) + 1
    horizon = max(steps)
    ids = [str(r.id) for r in ds.records]
    groups = [group_name(r.values) for r in ds.records]
    base = case_dice(run.network, EvalItems(ds, run.spec), run.spec, info.device, run.to_router,
                     config["trainable"])
    per_case: dict[int, dict[str, float]] = {0: dict(base)}
    trained = [s for s in steps if s > 0]
    total, done = k * horizon, [0]

    def progress() -> None:
        done[0] += 1
        emit("crossval", done=done[0], total=total, horizon=horizon, folds=k)

    for f in range(k):
        held = [i for i in range(n) if folds[i] == f]
        train_idx = [i for i in range(n) if folds[i] != f]
        if trained:
            eval_items = EvalItems(_subset_ds(ds, held), run.spec)
            scores = _fit_fold(run, run.network, train_idx, eval_items, trained, config, recipe, horizon, info,
                               seed * 1009 + f, progress)
            for s, dice in scores.items():
                per_case.setdefault(s, {}).update(dice)
    gain = {s: {i: per_case[s][i] - base[i] for i in ids} for s in steps}
    fold_ids = [[ids[i] for i in range(n) if folds[i] == f] for f in range(k)]
    mean_gain = {s: _mean(list(gain[s].values())) for s in steps}
    # crossval.keep_base false (the widget's box unticked): the user wants a trained model, the best step count
    allowed = steps if config["crossval"]["keep_base"] or not trained else trained
    chosen = _best({s: mean_gain[s] for s in allowed})
    # nested: each fold's gain at the step count the OTHER folds choose, so selection does not flatter the estimate
    nested: dict[str, float] = {}
    fold_gains, fold_choice = [], []
    for f in range(k):
        others = [i for g, fids in enumerate(fold_ids) if g != f for i in fids]
        s_f = _best({s: _mean([gain[s][i] for i in others]) for s in allowed})
        fold_choice.append(s_f)
        for i in fold_ids[f]:
            nested[i] = gain[s_f][i]
        fold_gains.append(_mean([gain[s_f][i] for i in fold_ids[f]]))
    estimate = {}
    for g in sorted(set(groups)):
        members = [i for i, gg in zip(ids, groups) if gg == g]
        before = _mean([base[i] for i in members])
        change = _mean([nested[i] for i in members])
        estimate[g] = {"n": len(members), "before": before, "after": before + change, "gain": change}
    sd = statistics.stdev(fold_gains) if len(fold_gains) > 1 else float("nan")
    record = {
        "method": "crossval", "folds": k, "cases": n, "candidates": steps, "steps": chosen,
        "kept_base": chosen == 0, "horizon": horizon,
        "mean_gain": {str(s): mean_gain[s] for s in steps},
        "fold_gain": {str(s): [_mean([gain[s][i] for i in fids]) for fids in fold_ids] for s in steps},
        "estimate": {"groups": estimate, "gain": _mean(list(nested.values())), "sd_over_folds": sd,
                     "fold_gains": fold_gains, "fold_steps": fold_choice,
                     "measured_on": MEASURED_ON.format(k=k)},
    }
    return json_safe(record)


def json_safe(value: Any) -> Any:
    """NaN -> None, recursively (JSON has no NaN)."""
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value
