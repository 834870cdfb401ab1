"""Bounds on every size a model spec states, checked before a network is built from it.

A model file is data from elsewhere: a header asking for depth 10**7 or hidden 2**20 would otherwise grow memory
without limit. The bounds are far above any model we ship or the paper trains (paper TransUNet: hidden 768,
depth 12, heads 12, MLP 3072) and far below what would exhaust a workstation.
"""
from __future__ import annotations

import math
from typing import Any

from napari_dmoe.model.spec import ModelSpec, SpecError

# arch_kwargs key -> (lowest, highest) for integers
INT_LIMITS: dict[str, tuple[int, int]] = {
    "img_size": (8, 2048), "patch_size": (1, 128), "hidden": (1, 4096), "depth": (0, 64), "heads": (1, 64),
    "mlp_dim": (1, 16384), "head_channels": (1, 4096), "feature_size": (1, 512), "decoder_channels": (1, 4096),
}
FLOAT_KEYS = ("dropout", "attn_dropout")
MAX_EXPERTS, MAX_CLASSES, MAX_CHANNELS = 256, 1024, 64
MAX_ATTRIBUTES, MAX_VALUES, MAX_ROUTERS = 8, 1024, 4096
MAX_INPUT = 2048  # voxels along one axis of the model's window
MAX_TEXT = 1000  # characters of a class name or an attribute value
MAX_SPEC_BYTES = 4 * 2**20  # the JSON spec in a model header


def _int(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{name}={value!r}: expected an integer")
    if not low <= value <= high:
        raise SpecError(f"{name}={value}: must be between {low} and {high}")
    return value


def check_bounds(spec: ModelSpec) -> None:
    """Refuse a spec whose sizes are out of bounds (SpecError naming the field)."""
    _int(spec.n_experts, "n_experts", 1, MAX_EXPERTS)
    _int(spec.top_k, "top_k", 1, MAX_EXPERTS)
    _int(spec.in_channels, "in_channels", 1, MAX_CHANNELS)
    if not isinstance(spec.class_names, list) or not 2 <= len(spec.class_names) <= MAX_CLASSES:
        raise SpecError(f"class_names: expected a list of 2 to {MAX_CLASSES} names")
    if len(spec.attributes) > MAX_ATTRIBUTES:
        raise SpecError(f"attributes: {len(spec.attributes)} attributes; at most {MAX_ATTRIBUTES}")
    for attr in spec.attributes:
        if not isinstance(attr.values, list) or len(attr.values) > MAX_VALUES:
            raise SpecError(f"attribute {str(attr.name)[:40]!r}: expected a list of at most {MAX_VALUES} values")
    texts = [*spec.class_names, *(a.name for a in spec.attributes), *(v for a in spec.attributes for v in a.values)]
    if any(not isinstance(t, str) or len(t) > MAX_TEXT for t in texts):
        raise SpecError(f"class and attribute names must be strings of at most {MAX_TEXT} characters")
    routers = math.prod(len(a.values) for a in spec.attributes)
    if routers > MAX_ROUTERS:
        raise SpecError(f"attributes: {routers} value combinations (routers); at most {MAX_ROUTERS}")
    if not isinstance(spec.input_size, list):
        raise SpecError("input_size: expected a list of integers")
    for i, n in enumerate(spec.input_size):
        _int(n, f"input_size[{i}]", 1, MAX_INPUT)
    if not isinstance(spec.arch_kwargs, dict):
        raise SpecError("arch_kwargs: expected an object")
    for key, value in spec.arch_kwargs.items():
        if key in INT_LIMITS:
            low, high = INT_LIMITS[key]
            for i, v in enumerate(value if isinstance(value, list) and key == "decoder_channels" else [value]):
                _int(v, f"arch_kwargs.{key}" + (f"[{i}]" if key == "decoder_channels" else ""), low, high)
            if key == "decoder_channels" and not (isinstance(value, list) and 1 <= len(value) <= 8):
                raise SpecError("arch_kwargs.decoder_channels: expected a list of 1 to 8 integers")
        elif key in FLOAT_KEYS and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                        and 0 <= value < 1):
            raise SpecError(f"arch_kwargs.{key}={value!r}: expected a number in [0, 1)")
    check_normalization(spec.normalization)
    if spec.spacing is not None and not all(
            isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) and 0 < s <= 100
            for s in spec.spacing):
        raise SpecError(f"spacing {spec.spacing}: expected voxel sizes in mm, each in (0, 100]")


def check_normalization(normalization: Any) -> None:
    """Every number of a normalisation must be finite: a NaN would turn every image into NaN (all background)."""
    if not isinstance(normalization, dict):
        raise SpecError("normalization: expected an object with a 'kind'")
    for key, value in normalization.items():
        if key == "kind":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise SpecError(f"normalization.{key}={value!r}: expected a finite number")
    if normalization.get("kind") == "scale" and normalization.get("factor", 1) == 0:
        raise SpecError("normalization.factor: must not be 0")
