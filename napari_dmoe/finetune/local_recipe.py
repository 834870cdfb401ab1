"""The group-local fine-tune's recipe (defaults chosen on validation draws: BENCHMARKS.md, fine-tune at a new site)."""
from __future__ import annotations

from typing import Any

# The group-local recipe: Adam (a few thousand private weights, no momentum tuning needed), constant lr after a
# short warm-up, k-fold cross-validation over every corrected case choosing among LOCAL_STEPS // 4 ... LOCAL_STEPS
LOCAL_LR, LOCAL_STEPS, LOCAL_EXPERTS, LOCAL_FOLDS, LOCAL_WARMUP = 0.01, 40, 1, 5, 5


def candidate_steps(steps: int) -> list[int]:
    """The step counts cross-validation compares: a quarter, half, three quarters and all of ``steps``."""
    return sorted({max(1, round(steps * q / 4)) for q in (1, 2, 3, 4)})


def local_recipe() -> dict[str, Any]:
    """Adam at a constant lr after a warm-up (poly power 0): s steps of a fold's run are what a run of s steps does,
    so cross-validation can score every candidate step count along one run per fold."""
    return {"optimizer": "adamw", "weight_decay": 0.0, "poly_power": 0.0, "warmup_steps": LOCAL_WARMUP}
