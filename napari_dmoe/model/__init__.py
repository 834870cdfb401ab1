"""Networks (pure torch, no I/O): ``build_network(spec)``, named ``PRESETS`` and ``make_spec``."""
from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from napari_dmoe.model.spec import Attribute, ModelSpec, SpecError

# Named arch_kwargs. "paper" = the released models; "small" runs on a laptop CPU; "tiny" is for tests.
PRESETS: dict[str, dict[str, Any]] = {
    "transunet2d-paper": dict(img_size=224, patch_size=16, hidden=768, depth=12, heads=12, mlp_dim=3072,
                              head_channels=512, decoder_channels=[256, 128, 64, 16]),
    "transunet2d-small": dict(img_size=128, patch_size=16, hidden=192, depth=4, heads=3, mlp_dim=768,
                              head_channels=128, decoder_channels=[64, 32, 16, 16]),
    "transunet2d-tiny": dict(img_size=64, patch_size=16, hidden=32, depth=2, heads=2, mlp_dim=64,
                             head_channels=16, decoder_channels=[16, 8, 8, 8]),
    "resunet3d-paper": dict(feature_size=24),
    "resunet3d-small": dict(feature_size=8),
    "resunet3d-tiny": dict(feature_size=4),
}

_INPUT_SIZE = {"resunet3d-paper": [96, 96, 96], "resunet3d-small": [96, 96, 64], "resunet3d-tiny": [64, 64, 64]}


def preset_arch(preset: str) -> str:
    """Architecture name of a preset ("transunet2d-small" -> "transunet2d")."""
    if preset not in PRESETS:
        raise SpecError(f"unknown preset {preset!r}: expected one of {sorted(PRESETS)}")
    return preset.split("-")[0]


def build_network(spec: ModelSpec) -> nn.Module:
    """The torch module a spec describes, freshly initialised (load weights separately)."""
    from napari_dmoe.model.resunet3d import ResUNet3D
    from napari_dmoe.model.transunet import TransUNet

    classes = {"transunet2d": TransUNet, "resunet3d": ResUNet3D}
    if spec.arch not in classes:
        raise SpecError(f"arch={spec.arch!r}: expected one of {sorted(classes)}")
    kwargs = dict(spec.arch_kwargs)
    try:
        built = classes[spec.arch](
            in_channels=spec.in_channels, n_classes=spec.n_classes, n_routers=spec.n_routers,
            n_experts=spec.n_experts, top_k=spec.top_k, **kwargs,
        )
    except TypeError as err:  # unknown arch_kwargs
        raise SpecError(f"arch_kwargs {sorted(kwargs)} do not fit {spec.arch}: {err}") from None
    except ValueError as err:  # inconsistent sizes
        raise SpecError(f"arch_kwargs for {spec.arch} are inconsistent: {err}") from None
    from napari_dmoe.model.moe import apply_local_experts

    try:
        return apply_local_experts(built, spec.local_experts)  # group-local fine-tunes (None: none)
    except ValueError as err:
        raise SpecError(f"local_experts: {err}") from None


def make_spec(
    preset: str,
    attribute_name: str,
    attribute_values: Sequence[str],
    class_names: Sequence[str],
    routing: str = "dmoe",
    **overrides: Any,
) -> ModelSpec:
    """A ModelSpec from a preset. ``overrides`` naming an arch kwarg (e.g. ``img_size``) change the architecture;
    others set ModelSpec fields (e.g. ``in_channels``, ``normalization``, ``n_experts``)."""
    arch = preset_arch(preset)
    arch_kwargs = dict(PRESETS[preset])
    fields: dict[str, Any] = {}
    for key, value in overrides.items():
        (arch_kwargs if key in arch_kwargs or key in _EXTRA_ARCH_KWARGS else fields)[key] = value
    if "input_size" not in fields:
        if arch == "transunet2d":
            fields["input_size"] = [arch_kwargs["img_size"]] * 2
        else:
            fields["input_size"] = list(_INPUT_SIZE[preset])
    if arch == "transunet2d" and list(fields["input_size"]) != [arch_kwargs["img_size"]] * 2:
        raise SpecError(f"input_size {fields['input_size']} must be [img_size, img_size] = "
                        f"{[arch_kwargs['img_size']] * 2} for a TransUNet")
    return ModelSpec(
        arch=arch, class_names=list(class_names), attributes=[Attribute(attribute_name, list(attribute_values))],
        arch_kwargs=arch_kwargs, routing=routing, **fields,
    )


# Arch kwargs not in every preset but accepted by the constructors.
_EXTRA_ARCH_KWARGS = {"dropout", "attn_dropout", "moe_per_block", "noisy_eval", "norm_name"}

__all__ = ["PRESETS", "build_network", "make_spec", "preset_arch", "ModelSpec", "Attribute", "SpecError"]
