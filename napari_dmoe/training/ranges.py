"""The range of every number a training config holds (``training.config.SCHEMA``), checked by ``validate``."""
from __future__ import annotations

import math
from typing import Any, Mapping

# The range of every number in SCHEMA: (low, high, low_open, high_open); None = unbounded on that side. A number
# outside its range is refused naming the key (issue 28: grad_clip -1 reversed every gradient and the run exited 0).
# ``tests/test_trust_verbs.py`` checks that every int and number key of ``config.SCHEMA`` has one.
RANGES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "seed": (0, 2**32 - 1, False, False),  # numpy's seeds
    "febs_gamma": (0, None, False, False),
    "aux_loss": (0, None, False, False),
    "router_smoothing": (0, None, False, False),
    "local_experts": (1, None, False, False),
    "fallback_min_cases": (0, None, False, False),
    "data.val_fraction": (0, 1, False, True),
    "data.test_fraction": (0, 1, False, True),
    "data.crop": (1, None, False, False),
    "data.in_channels": (1, None, False, False),
    "model.n_experts": (1, None, False, False),
    "model.top_k": (1, None, False, False),
    "model.router_mix": (0, 1, False, True),
    "recipe.lr": (0, None, True, False),
    "recipe.weight_decay": (0, None, False, False),
    "recipe.momentum": (0, 1, False, True),
    "recipe.poly_power": (0, None, False, False),  # 0: constant rate; negative would grow it towards infinity
    "recipe.warmup_steps": (0, None, False, False),
    "recipe.steps": (1, None, False, False),
    "recipe.epochs": (1, None, False, False),
    "recipe.batch_size": (1, None, False, False),
    "recipe.grad_clip": (0, None, True, False),  # a norm: null turns clipping off
    "recipe.val_every": (1, None, False, False),
    "recipe.checkpoint_every": (1, None, False, False),
    "recipe.num_workers": (0, None, False, False),
    "recipe.sw_overlap": (0, 1, False, True),
    "recipe.ema": (0, 1, False, True),
    "augment.rotate_degrees": (0, 180, False, False),
    "augment.intensity": (0, None, False, False),
    "augment.prob": (0, 1, False, False),
    "augment.contrast": (0, None, False, False),
    "augment.blur": (0, None, False, False),
    "augment.noise": (0, None, False, False),
    "augment.bias_field": (0, None, False, False),
    "augment.low_res": (0, 1, False, True),
    "augment.colour": (0, None, False, False),
    "augment.site_prob": (0, 1, False, False),
    "augment.zoom": (0, 1, False, True),
    "sampling.group_balance": (0, 1, False, False),
    "sampling.router_dropout": (0, 1, False, False),
    "crossval.folds": (0, None, False, False),  # 1 is refused with the folds' own message (0 = off)
}


def out_of_range(config: Mapping[str, Any]) -> str | None:
    """The message for the first number of a validated ``config`` outside its range, or None."""
    for key, (low, high, low_open, high_open) in RANGES.items():
        node: Any = config
        for part in key.split("."):
            node = node[part]
        if node is None:
            continue
        bad = not math.isfinite(node) or (low is not None and (node <= low if low_open else node < low)) or \
            (high is not None and (node >= high if high_open else node > high))
        if bad:
            left = "-inf" if low is None else f"{low:g}"
            right = "inf" if high is None else f"{high:g}"
            opening, closing = "(" if low_open or low is None else "[", ")" if high_open or high is None else "]"
            span = f"{opening}{left}, {right}{closing}"
            return f"config key {key!r}: {node!r} is outside its range {span}; fix the config"
    return None
