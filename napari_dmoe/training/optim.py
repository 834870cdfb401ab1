"""A recipe's defaults, optimizer and learning-rate schedule, shared by the training engine and cross-validation."""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch


def lr_schedule(recipe: Mapping[str, Any], total: int):
    """lr multiplier per step: paper2d poly (1 - t/T)^0.9; 3d linear warmup then cosine to 0."""
    warm, power = int(recipe["warmup_steps"]), float(recipe["poly_power"])

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, total - warm)
        if recipe["schedule"] == "poly":
            return max(0.0, 1.0 - t) ** power
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    return factor


def make_optimizer(params: list, recipe: Mapping[str, Any]) -> torch.optim.Optimizer:
    if recipe["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=recipe["lr"], momentum=recipe["momentum"],
                               weight_decay=recipe["weight_decay"])
    return torch.optim.AdamW(params, lr=recipe["lr"], weight_decay=recipe["weight_decay"])


def resolve_recipe(config: Mapping[str, Any], total_steps: int) -> dict[str, Any]:
    """Recipe numbers with defaults filled: paper2d = SGD, lr 0.01 * batch / 24, poly 0.9; 3d = AdamW,
    warmup + cosine."""
    r = dict(config["recipe"])
    if r["name"] == "paper2d":
        r["optimizer"] = r.get("optimizer") or "sgd"
        r["lr"] = r["lr"] if r["lr"] is not None else 0.01 * r["batch_size"] / 24
        r["weight_decay"] = r["weight_decay"] if r["weight_decay"] is not None else 1e-4
        r["warmup_steps"] = r["warmup_steps"] or 0
        r["schedule"] = "poly"
    else:
        r["optimizer"] = r.get("optimizer") or "adamw"
        r["lr"] = r["lr"] if r["lr"] is not None else 1e-4
        r["weight_decay"] = r["weight_decay"] if r["weight_decay"] is not None else 1e-5
        r["warmup_steps"] = r["warmup_steps"] if r["warmup_steps"] is not None else max(1, total_steps // 20)
        r["schedule"] = "warmup_cosine"
    return r
