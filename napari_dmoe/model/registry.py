"""The networks napari-dmoe can build: architecture name -> network class, each registered once.

A network class describes itself, so nothing outside its file needs to know it (spec validation, presets,
inference windows, routing-position names, fine-tune configs all ask here):

    class MyNet(nn.Module):
        spatial_dims = 2                                   # 2 or 3
        presets = {"tiny": Preset({"width": 8}, input_size=(64, 64))}   # "<arch>-tiny" in configs

        @classmethod
        def input_rule(cls, arch_kwargs) -> InputRule:     # the spatial sizes forward() accepts
            return InputRule(divisor=8, min_size=16)       # or InputRule(fixed=(224, 224))

        @classmethod
        def routing_positions(cls, arch_kwargs) -> list[str]:   # the position= names its DMoE calls pass
            return ["stage0"]

        def __init__(self, in_channels, n_classes, n_routers, n_experts, top_k, width=8): ...
        def forward(self, x, attr=None): ...               # logits [B, n_classes, *spatial]

Its size keywords (``width`` here) are named in the constructor: ``make_spec`` sends an override with such a
name to ``arch_kwargs`` and any other to the spec. ``n_routers`` is 0 for a model without experts.

    register("mynet2d", MyNet)                            # or add one line to _BUILTIN below

The spec file format does not change: a model file names its ``arch`` and ``arch_kwargs``.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

from napari_dmoe.model.spec import SpecError

# The networks that ship: name -> "module:Class", imported on first use (so listing names costs nothing).
_BUILTIN: dict[str, str] = {
    "transunet2d": "napari_dmoe.model.transunet:TransUNet",
    "resunet3d": "napari_dmoe.model.resunet3d:ResUNet3D",
}
_NETWORKS: dict[str, Any] = dict(_BUILTIN)


@dataclass(frozen=True)
class InputRule:
    """The spatial sizes a network accepts: exactly ``fixed`` (e.g. learned position embeddings), or along each
    axis any multiple of ``divisor`` that is at least ``min_size`` (e.g. a UNet that halves the grid n times)."""

    fixed: tuple[int, ...] | None = None
    divisor: int = 1
    min_size: int = 1

    def problem(self, size: Sequence[int]) -> str | None:
        """Why ``size`` cannot go through the network (one sentence), or None when it can."""
        size = tuple(int(s) for s in size)
        if self.fixed is not None:
            return None if size == tuple(self.fixed) else f"must be exactly {list(self.fixed)}"
        if all(s % self.divisor == 0 and s >= self.min_size for s in size):
            return None
        return f"must be multiples of {self.divisor}, each at least {self.min_size}"

    def fit(self, n: int) -> int:
        """The smallest accepted size along one axis that holds ``n`` (divisor rule)."""
        return max(self.min_size, math.ceil(n / self.divisor) * self.divisor)

    def nearest(self, n: int) -> tuple[int, int]:
        """The accepted sizes just below and just above ``n`` along one axis (divisor rule)."""
        d = self.divisor
        return max(self.min_size, n // d * d), max(self.min_size, (n // d + 1) * d)


@dataclass(frozen=True)
class Preset:
    """Named sizes of a network: its constructor's ``arch_kwargs`` and the default ``input_size`` (None: the
    input rule's fixed size)."""

    arch_kwargs: Mapping[str, Any] = field(default_factory=dict)
    input_size: tuple[int, ...] | None = None


def register(arch: str, network: type | str, replace: bool = False) -> None:
    """Make ``network`` (a class, or "module:Class" imported on first use) buildable as ``arch``."""
    if arch in _NETWORKS and not replace and _NETWORKS[arch] is not network:
        raise SpecError(f"a network is already registered as {arch!r}; pass replace=True to replace it")
    if "-" in arch:
        raise SpecError(f"network name {arch!r} must not contain '-' (presets are named '<arch>-<size>')")
    _NETWORKS[arch] = network


def unregister(arch: str) -> None:
    """Forget ``arch`` (tests that register a network of their own clean up with this)."""
    _NETWORKS.pop(arch, None)


def arches() -> tuple[str, ...]:
    """Names of the registered networks (without importing them)."""
    return tuple(_NETWORKS)


def network_class(arch: str) -> type:
    """The class registered as ``arch``; SpecError naming the known ones otherwise."""
    if arch not in _NETWORKS:
        raise SpecError(f"arch={arch!r}: expected one of {list(_NETWORKS)}")
    entry = _NETWORKS[arch]
    if isinstance(entry, str):
        module, _, name = entry.partition(":")
        entry = _NETWORKS[arch] = getattr(importlib.import_module(module), name)
    return entry


def input_rule(arch: str, arch_kwargs: Mapping[str, Any]) -> InputRule:
    return network_class(arch).input_rule(dict(arch_kwargs))


def routing_positions(spec: Any) -> list[str]:
    """Names of a model's dMoE positions (as ``capture_routing`` reports them), without running it."""
    if spec.routing == "none":
        return []
    return list(network_class(spec.arch).routing_positions(dict(spec.arch_kwargs)))


class _Presets(Mapping):
    """Every registered network's presets, ``"<arch>-<name>" -> arch_kwargs``; a live view of the registry."""

    def _all(self) -> dict[str, tuple[str, Preset]]:
        return {f"{arch}-{name}": (arch, preset) for arch in _NETWORKS
                for name, preset in network_class(arch).presets.items()}

    def __getitem__(self, name: str) -> dict[str, Any]:
        return dict(self._all()[name][1].arch_kwargs)

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


PRESETS: Mapping[str, dict[str, Any]] = _Presets()


def find_preset(name: str) -> tuple[str, Preset]:
    """(arch, Preset) of a preset name such as "transunet2d-small"; SpecError naming the known ones otherwise."""
    arch, _, size = name.partition("-")
    presets = network_class(arch).presets if arch in _NETWORKS else {}
    if size not in presets:
        raise SpecError(f"unknown preset {name!r}: expected one of {sorted(PRESETS)}")
    return arch, presets[size]


def preset_for(spec: Any) -> str:
    """The preset of ``spec.arch`` whose arch kwargs all match the spec's, else that network's first preset
    (a config names a preset and overrides what differs)."""
    presets = network_class(spec.arch).presets
    for name, preset in presets.items():
        if all(spec.arch_kwargs.get(k) == v for k, v in preset.arch_kwargs.items()):
            return f"{spec.arch}-{name}"
    return f"{spec.arch}-{next(iter(presets))}"


def arch_kwarg_names(arch: str) -> set[str]:
    """The size/option keywords a network's constructor takes besides the common ones."""
    import inspect

    common = {"self", "in_channels", "n_classes", "n_routers", "n_experts", "top_k"}
    params = inspect.signature(network_class(arch).__init__).parameters
    return {n for n, p in params.items() if n not in common and p.kind is not p.VAR_KEYWORD}
