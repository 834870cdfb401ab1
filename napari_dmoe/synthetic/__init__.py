"""Synthetic, seeded stand-ins for the paper's datasets (FairSeg fundus, HAM10000 skin, prostate CT).

numpy + scipy only, fast enough to make napari samples on the fly. Each generator carries a documented
group-dependent labelling convention so that a model ignoring the attribute underperforms on rare groups;
see sample_data/README.md for what these data can and cannot show.
"""
from __future__ import annotations

from napari_dmoe.synthetic.common import SyntheticDataError, allocate, rng_for
from napari_dmoe.synthetic.fundus import GROUP_LOOK, RACE_FREQUENCIES, RACES, FundusSample, make_fundus, write_fairseg
from napari_dmoe.synthetic.fundus import SITES as FUNDUS_SITES
from napari_dmoe.synthetic.prostate import STAGE_FREQUENCIES, STAGES, ProstateCase, make_prostate, write_prostate
from napari_dmoe.synthetic.prostate import SITES as PROSTATE_SITES
from napari_dmoe.synthetic.skin import AGE_FREQUENCIES, AGE_GROUPS, SkinSample, make_skin, write_ham10000

__all__ = [
    "SyntheticDataError", "allocate", "rng_for",
    "RACES", "RACE_FREQUENCIES", "GROUP_LOOK", "FUNDUS_SITES", "FundusSample", "make_fundus", "write_fairseg",
    "AGE_GROUPS", "AGE_FREQUENCIES", "SkinSample", "make_skin", "write_ham10000",
    "STAGES", "STAGE_FREQUENCIES", "PROSTATE_SITES", "ProstateCase", "make_prostate", "write_prostate",
]
