"""The bundled demo models' reference sets: a few small labelled cases per group, generated at run time.

A fine-tune's before/after must cover the groups the user did not correct. The user has no labels for those; for
the demo models we do: their synthetic generators (``napari_dmoe.synthetic``, the data they were trained on, site
"a") make a few cases per group, deterministically from a fixed seed and case indices no training split uses, so
nothing ships but the generator code. Other models have no reference set (``reference_cases`` returns []), and
the comparison falls back to how much the masks change (``finetune.compare``).
"""
from __future__ import annotations

import os
from pathlib import Path

from napari_dmoe.evaluation.loop import Case

REFERENCE_SEED = 20_262  # not the seed of any demo training or test split
PER_GROUP = {"fundus-dmoe": 4, "skin-dmoe": 3, "prostate-dmoe": 2}
FIRST_INDEX = 100_000  # case indices far beyond every generated split


def _fundus(n: int) -> list[Case]:
    from napari_dmoe.synthetic import RACES, make_fundus

    out = []
    for g in RACES:
        for i in range(n):
            s = make_fundus(REFERENCE_SEED, race=g, size=224, index=FIRST_INDEX + i)
            out.append(Case(f"reference {g} {i + 1}", g, s.image, s.classes, {"race": g}))
    return out


def _skin(n: int) -> list[Case]:
    from napari_dmoe.synthetic import AGE_GROUPS, make_skin

    out = []
    for g in AGE_GROUPS:
        for i in range(n):
            s = make_skin(REFERENCE_SEED, age_group=g, lesion=FIRST_INDEX + i)
            out.append(Case(f"reference {g} {i + 1}", g, s.image, (s.mask > 0).astype("uint8"), {"age": g},
                            rgb=True))
    return out


def _prostate(n: int) -> list[Case]:
    from napari_dmoe.synthetic import STAGES, make_prostate

    out = []
    for g in STAGES:
        for i in range(n):
            image, label, spacing = make_prostate(REFERENCE_SEED, stage=g, index=FIRST_INDEX + i).napari_order()
            out.append(Case(f"reference {g} {i + 1}", g, image, label.astype("uint8"), {"stage": g}, spacing))
    return out


_BUILDERS = {"fundus-dmoe": _fundus, "skin-dmoe": _skin, "prostate-dmoe": _prostate}


def reference_cases(model_path: str | os.PathLike) -> list[Case]:
    """The reference set of a bundled demo model (by its file in the package's models folder), else []."""
    from napari_dmoe.io.model_list import bundled_dir

    path = Path(model_path).resolve()
    if path.parent != bundled_dir().resolve() or path.stem not in _BUILDERS:
        return []
    return _BUILDERS[path.stem](PER_GROUP[path.stem])
