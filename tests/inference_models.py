"""Tiny real models and inputs shared by the inference tests."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from napari_dmoe.model import build_network, make_spec

RACES = ["Asian", "Black", "White"]


@dataclasses.dataclass
class TinyModel:  # what checkpoint.load_model returns: .spec, .network, .path
    spec: object
    network: torch.nn.Module
    path: str = ""


def tiny(preset: str, routing: str = "dmoe", **spec_changes) -> TinyModel:
    spec = make_spec(preset, "race", RACES, ["background", "rim", "cup"], routing=routing)
    spec = dataclasses.replace(spec, **spec_changes) if spec_changes else spec
    torch.manual_seed(0)
    return TinyModel(spec, build_network(spec).eval())


def rng_image(*shape: int) -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.normal(100, 20, size=shape).astype(np.float32)


def assert_routing_sums_to_one(seg) -> None:
    for position, m in seg.routing.items():
        assert m.dtype == np.float16
        total = m.astype(np.float32).sum(axis=0)
        # float16 per expert: each rounds by <= 2**-11 relative, so E=8 values sum within ~4e-3 of 1
        assert np.abs(total - 1).max() < 1e-2, position

