"""Tiny real models and inputs shared by the inference tests."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from napari_dmoe.model import build_network, make_spec

RACES = ["Asian", "Black", "White"]
WIDGET_CLASSES = ["background", "rim", "cup"]


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


def make_image(shape=(48, 64)) -> np.ndarray:
    yy, xx = np.mgrid[: shape[-2], : shape[-1]]
    return (np.sin(xx / 5.0) + np.cos(yy / 7.0)).astype(np.float32)




def make_model(path, seed: int = 0):
    """A tiny TransUNet-dMoE whose masks depend on the image and the attribute (random weights, scaled so
    the routers, experts and head are decisive; head bias centred so all three classes appear)."""
    from napari_dmoe.io.checkpoint import save_model

    torch.manual_seed(seed)
    spec = make_spec("transunet2d-tiny", "race", RACES, WIDGET_CLASSES, n_experts=4)
    net = build_network(spec).eval()
    x = torch.from_numpy(make_image((64, 64)))[None, None]
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "routers" in name:
                p.mul_(10)
            if "experts" in name and "weight" in name:
                p.mul_(3)
        net.segmentation_head.weight.mul_(20)
        logits = net((x - x.mean()) / x.std(), torch.tensor([1]))
        net.segmentation_head.bias.sub_(logits.mean(dim=(0, 2, 3)))
    return save_model(path, net, spec)


def write_png(path, seed: int = 0, shape=(40, 48)):
    """A random 8-bit grey PNG at ``path`` (returned)."""
    from PIL import Image

    Image.fromarray((np.random.default_rng(seed).random(shape) * 255).astype("uint8")).save(path)
    return path
