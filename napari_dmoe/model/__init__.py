"""Networks (pure torch, no I/O): ``build_network(spec)``, named ``PRESETS`` and ``make_spec``.

Which networks exist, and what each accepts, is in ``registry`` (each network class describes itself)."""
from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from napari_dmoe.model import registry
from napari_dmoe.model.spec import Attribute, ModelSpec, SpecError

PRESETS = registry.PRESETS  # "<arch>-<size>" -> arch_kwargs, from every registered network's own presets


def preset_arch(preset: str) -> str:
    """Architecture name of a preset ("transunet2d-small" -> "transunet2d")."""
    return registry.find_preset(preset)[0]


def build_network(spec: ModelSpec) -> nn.Module:
    """The torch module a spec describes, freshly initialised (load weights separately)."""
    network = registry.network_class(spec.arch)
    kwargs = dict(spec.arch_kwargs)
    try:
        built = network(
            in_channels=spec.in_channels, n_classes=spec.n_classes, n_routers=spec.n_routers,
            n_experts=spec.n_experts, top_k=spec.top_k, **kwargs,
        )
    except TypeError as err:  # unknown arch_kwargs
        raise SpecError(f"arch_kwargs {sorted(kwargs)} do not fit {spec.arch}: {err}") from None
    except ValueError as err:  # inconsistent sizes
        raise SpecError(f"arch_kwargs for {spec.arch} are inconsistent: {err}") from None
    from napari_dmoe.model.moe import apply_local_experts, apply_router_mix

    try:
        apply_router_mix(built, spec.router_mix)  # a shared router mixed into each group's (0: none)
    except ValueError as err:
        raise SpecError(f"router_mix: {err}") from None
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
    arch, named = registry.find_preset(preset)
    arch_kwargs = dict(named.arch_kwargs)
    known = registry.arch_kwarg_names(arch)
    fields: dict[str, Any] = {}
    for key, value in overrides.items():
        (arch_kwargs if key in known else fields)[key] = value
    rule = registry.input_rule(arch, arch_kwargs)
    if "input_size" not in fields:
        fields["input_size"] = list(named.input_size or rule.fixed or ())
    problem = rule.problem(fields["input_size"])
    if problem:
        raise SpecError(f"input_size {list(fields['input_size'])} {problem} for {arch} with these sizes")
    return ModelSpec(
        arch=arch, class_names=list(class_names), attributes=[Attribute(attribute_name, list(attribute_values))],
        arch_kwargs=arch_kwargs, routing=routing, **fields,
    )


__all__ = ["PRESETS", "build_network", "make_spec", "preset_arch", "ModelSpec", "Attribute", "SpecError"]
