"""Import checkpoints of the official dMoE code (github tvseg/dMoE) into napari-dmoe networks.

2D: ``VisionTransformer`` (FairSeg TransUNet) state dicts; 3D: ``ContextUNETR`` from ``dmoeunet.py``. All sizes
are read from tensor shapes. Our module names mirror the official ones, so only the MoE keys and the 2D head
are renamed. Files are read with ``torch.load(weights_only=True)``: nothing is unpickled beyond tensors.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from napari_dmoe.model import build_network, registry
from napari_dmoe.model.spec import Attribute, ModelSpec

# Official key pattern -> ours. Applied in order to every key.
_RENAMES = [
    (re.compile(r"^transformer\.encoder\.sparseMoE\."), "transformer.encoder.moe.0."),  # 2D: one shared SparseMoE
    (re.compile(r"^sparseMoE\.(\d+)\."), r"moe.\1."),  # 3D: one SparseMoE per encoder stage
    (re.compile(r"\.router\.(\d+)\.topkroute_linear\."), r".routers.\1.gate."),
    (re.compile(r"\.router\.(\d+)\.noise_linear\."), r".routers.\1.noise."),
    (re.compile(r"\.experts\.(\d+)\.net\.0\."), r".experts.\1.fc1."),
    (re.compile(r"\.experts\.(\d+)\.net\.2\."), r".experts.\1.fc2."),
    (re.compile(r"^segmentation_head\.0\."), "segmentation_head."),
]


class OfficialImportError(ValueError):
    """An official checkpoint cannot be imported; the message names the file or key and the problem."""


def _count(keys: Sequence[str], pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def _need(sd: Mapping[str, Tensor], key: str, arch: str) -> Tensor:
    if key not in sd:
        raise OfficialImportError(f"key {key!r} is missing: this is not an official {arch} dMoE checkpoint")
    return sd[key]


def _sizes_2d(sd: Mapping[str, Tensor], heads: int | None) -> tuple[dict[str, Any], int, int]:
    keys = list(sd)
    if any(k.startswith("transformer.embeddings.hybrid_model.") for k in keys):
        raise OfficialImportError("R50-ViT hybrid checkpoints are not supported; only the plain ViT TransUNet is")
    pos = _need(sd, "transformer.embeddings.position_embeddings", "transunet2d")
    patch = _need(sd, "transformer.embeddings.patch_embeddings.weight", "transunet2d")
    hidden, n_patches, patch_size = pos.shape[-1], pos.shape[1], patch.shape[-1]
    grid = math.isqrt(n_patches)
    depth = _count(keys, r"^transformer\.encoder\.layer\.(\d+)\.")
    n_blocks = _count(keys, r"^decoder\.blocks\.(\d+)\.")
    kwargs = dict(
        img_size=grid * patch_size,
        patch_size=patch_size,
        hidden=hidden,
        depth=depth,
        # Head count is not stored in any shape; ViT convention is 64 channels per head.
        heads=heads or max(1, hidden // 64),
        mlp_dim=_need(sd, "transformer.encoder.layer.0.ffn.fc1.weight", "transunet2d").shape[0],
        head_channels=_need(sd, "decoder.conv_more.0.weight", "transunet2d").shape[0],
        decoder_channels=[sd[f"decoder.blocks.{i}.conv1.0.weight"].shape[0] for i in range(n_blocks)],
    )
    n_classes = _need(sd, "segmentation_head.0.weight", "transunet2d").shape[0]
    return kwargs, n_classes, patch.shape[1]


def _sizes_3d(sd: Mapping[str, Tensor], heads: int | None = None) -> tuple[dict[str, Any], int, int]:
    first = _need(sd, "encoder1.layer.conv1.conv.weight", "resunet3d")
    n_classes = _need(sd, "out.transp_conv.conv.weight", "resunet3d").shape[1]  # transposed conv: [in, out, ...]
    return dict(feature_size=first.shape[0]), n_classes, first.shape[1]


# The official checkpoint layouts we read, per network: sizes from shapes, where the MoE keys start, and the
# normalisation of the official pipeline (2D FairSeg: raw 0..255 intensities).
_LAYOUTS = {
    "transunet2d": (_sizes_2d, r"^transformer\.encoder\.sparseMoE\.", {"kind": "scale", "factor": 1.0}),
    "resunet3d": (_sizes_3d, r"^sparseMoE\.0\.", {"kind": "zscore"}),
}
ARCHES = tuple(_LAYOUTS)


def convert_official_state_dict(
    state_dict: Mapping[str, Tensor], arch: str, heads: int | None = None
) -> tuple[dict[str, Tensor], dict[str, Any], int, int, int, int, int]:
    """Official state dict -> (our_state_dict, arch_kwargs, n_routers, n_experts, top_k, n_classes, in_channels).

    A ``module.`` prefix (DataParallel) is stripped. ``top_k`` is 2 (hard-coded in the official code).
    ``in_channels`` is the patch/first conv's input channels (3 for the 2D model, which repeats grey input).
    """
    if arch not in ARCHES:
        raise OfficialImportError(f"arch={arch!r}: expected one of {list(ARCHES)}")
    sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}
    bad = [k for k, v in sd.items() if not isinstance(v, Tensor)]
    if bad:
        raise OfficialImportError(f"entries {bad[:3]} are not tensors: expected a state dict of tensors")
    sizes, moe, _ = _LAYOUTS[arch]
    arch_kwargs, n_classes, in_channels = sizes(sd, heads)
    keys = list(sd)
    n_routers = _count(keys, moe + r"router\.(\d+)\.")
    n_experts = _count(keys, moe + r"experts\.(\d+)\.")
    converted = {}
    for key, value in sd.items():
        for pattern, repl in _RENAMES:
            key = pattern.sub(repl, key)
        converted[key] = value
    return converted, arch_kwargs, n_routers, n_experts or 8, 2, n_classes, in_channels


def read_official(src_path: str | Path) -> dict[str, Tensor]:
    """The state dict in an official ``.pth``: a bare state dict or one under "state_dict" / "model"."""
    path = Path(src_path)
    if not path.is_file():
        raise OfficialImportError(f"{path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle refused (non-tensor objects) or not a torch file at all
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise OfficialImportError(f"{path}: not a loadable torch checkpoint of tensors ({first})") from None
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise OfficialImportError(f"{path}: expected a state dict (or a dict with 'state_dict' / 'model')")
    return dict(obj)


def import_official(
    src_path: str | Path,
    arch: str,
    attribute_name: str,
    attribute_values: Sequence[str],
    class_names: Sequence[str],
    *,
    in_channels: int | None = None,
    heads: int | None = None,
    input_size: Sequence[int] | None = None,
) -> tuple[nn.Module, ModelSpec]:
    """Build our network from an official checkpoint; returns (network in eval mode, spec).

    ``attribute_values`` names the routers in order (one per router, as the official attribute indices);
    ``class_names`` one per output channel, background first. ``in_channels=1`` for grey data on the 2D model.
    """
    path = Path(src_path)
    sd, arch_kwargs, n_routers, n_experts, top_k, n_classes, embed_channels = convert_official_state_dict(
        read_official(path), arch, heads
    )
    if n_routers and len(attribute_values) != n_routers:
        raise OfficialImportError(
            f"{path.name} has {n_routers} routers but {len(attribute_values)} attribute values were given "
            f"({list(attribute_values)}): give one value per router, in the order of the official attribute index"
        )
    if len(class_names) != n_classes:
        raise OfficialImportError(
            f"{path.name} predicts {n_classes} classes but {len(class_names)} class names were given "
            f"({list(class_names)}): give one name per output channel, background first"
        )
    # the network's fixed size, else the size of its paper preset (the official default)
    rule = registry.input_rule(arch, arch_kwargs)
    size = list(input_size or rule.fixed or registry.find_preset(f"{arch}-paper")[1].input_size)
    channels = in_channels or embed_channels
    normalization = _LAYOUTS[arch][2]
    spec = ModelSpec(
        arch=arch, class_names=list(class_names),
        attributes=[Attribute(attribute_name, list(attribute_values) or ["all"])],
        arch_kwargs=arch_kwargs, routing="dmoe" if n_routers else "none", n_experts=n_experts, top_k=top_k,
        in_channels=channels, input_size=size, normalization=normalization,
        provenance={"source": "official dMoE checkpoint", "file": path.name,
                    "assumed": "heads = hidden/64 unless given; normalization and input size from the official "
                               "defaults; check them against how the checkpoint was trained"},
    )
    network = build_network(spec)
    try:
        missing, unexpected = network.load_state_dict(sd, strict=False)
    except RuntimeError as err:  # tensor shape mismatches
        raise OfficialImportError(f"{path.name}: tensor shapes do not fit an official {arch} model: "
                                  f"{str(err).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise OfficialImportError(
            f"{path.name} does not match an official {arch} model: missing {sorted(missing)[:4]}, "
            f"unexpected {sorted(unexpected)[:4]}"
        )
    return network.eval(), spec
