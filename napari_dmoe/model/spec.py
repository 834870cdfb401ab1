"""ModelSpec: everything needed to rebuild a network and use it.

The spec travels next to the weights as JSON, so a model file is self-describing: loading never needs
the user to know the architecture, the attribute vocabulary or the preprocessing.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

FORMAT_VERSION = 1
ROUTINGS = ("dmoe", "moe", "none")
NORMALIZATIONS = ("zscore", "minmax", "window", "scale")
# ModelSpec.trained_on: modality ("fundus photo", "CT", "dermoscopy"; None when not stated), spatial_dims (2|3),
# channels, intensity ({mean, std, p1, p50, p99} pooled over the sampled training cases as read, before
# normalisation, plus case_p50/case_p99 = [min, max] over cases, n_cases, of_cases), spacing (median voxel size in
# mm of the cases that state one, else None), features (the model's own features on its training images and a
# threshold: inference/ood.py, which checks it before use), scale (2D: the median foreground radius the model finds
# on its training images, the reference of a site calibration: inference/scale.py)
TRAINED_ON_KEYS = ("modality", "spatial_dims", "channels", "intensity", "spacing", "features", "scale")


UNKNOWN = "unknown"  # an attribute value nobody knows: inference averages over the routers it could be


def is_unknown(value: Any) -> bool:
    """None, or "unknown" in any case and spacing."""
    return value is None or (isinstance(value, str) and value.strip().lower() == UNKNOWN)


def attribute_text(attribute: Mapping[str, Any] | str | None) -> str:
    """The one rendering of an attribute mapping: ``{"race": "Black", "sex": None}`` -> "race=Black, sex=unknown".
    A plain string (layer metadata written before attributes were mappings) is returned as it is."""
    if isinstance(attribute, str):
        return attribute
    if not attribute:
        return UNKNOWN
    return ", ".join(f"{k}={UNKNOWN if is_unknown(v) else v}" for k, v in attribute.items())


class SpecError(ValueError):
    """A model spec is malformed; the message names the field and what is expected."""


class InputShapeError(ValueError):
    """The image given to a network has the wrong size or channel count."""


@dataclass
class Attribute:
    """One patient attribute a model is conditioned on, with its ordered vocabulary."""

    name: str
    values: list[str]


@dataclass
class ModelSpec:
    """Architecture, routing, vocabulary, preprocessing and provenance of one model.

    Routers: ``routing="dmoe"`` has one router per combination of attribute values (a single attribute in the
    paper; several for intersectional models), ``"moe"`` one router for everybody, ``"none"`` no MoE at all.
    """

    arch: str
    class_names: list[str]
    attributes: list[Attribute]
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    routing: str = "dmoe"
    n_experts: int = 8
    top_k: int = 2
    # weight of a router every group shares, mixed into each group's (model/moe.py DMoE.add_shared_router); 0: none
    router_mix: float = 0.0
    in_channels: int = 1
    input_size: list[int] = field(default_factory=lambda: [224, 224])
    # {"kind": "zscore"} | {"kind": "minmax"} | {"kind": "window", "low": -200, "high": 300} | {"kind": "scale", "factor": 255}
    normalization: dict[str, Any] = field(default_factory=lambda: {"kind": "zscore"})
    spacing: list[float] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    # group-local fine-tune: per dMoE layer, [router, shared expert] pairs that have a private copy (model/moe.py
    # DMoE.add_local_experts); None in ordinary models and in files written before it existed
    local_experts: list[list[list[int]]] | None = None
    # what the model was trained on (see ``TRAINED_ON_KEYS``); None in files written before it existed
    trained_on: dict[str, Any] | None = None
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        self.attributes = [a if isinstance(a, Attribute) else Attribute(**a) for a in self.attributes]
        self.validate()

    # -- derived -------------------------------------------------------------------------------------------
    @property
    def spatial_dims(self) -> int:
        from napari_dmoe.model.registry import network_class  # the network says (registry imports this module)

        return int(network_class(self.arch).spatial_dims)

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def n_routers(self) -> int:
        """Routers the network holds: product of vocabulary sizes for dMoE, 1 for MoE, 0 without MoE."""
        if self.routing == "none":
            return 0
        if self.routing == "moe":
            return 1
        return math.prod(len(a.values) for a in self.attributes)

    def router_index(self, values: Mapping[str, str] | Sequence[str] | str) -> int:
        """Index of the router for one patient: mixed radix over the attributes, first attribute slowest.

        ``values`` is a mapping name -> value, a sequence in attribute order, or a single value when the model
        has one attribute. Unknown values raise SpecError naming the vocabulary.
        """
        if isinstance(values, str):
            values = [values]
        if isinstance(values, Mapping):
            missing = [a.name for a in self.attributes if a.name not in values]
            if missing:
                raise SpecError(f"no value given for attribute(s) {missing}")
            values = [values[a.name] for a in self.attributes]
        values = list(values)
        if len(values) != len(self.attributes):
            raise SpecError(f"expected {len(self.attributes)} attribute value(s), got {len(values)}")
        index = 0
        for attr, value in zip(self.attributes, values):
            value = str(value)
            if value not in attr.values:
                raise SpecError(f"{attr.name}={value!r} is not in this model's vocabulary {attr.values}")
            index = index * len(attr.values) + attr.values.index(value)
        return 0 if self.routing == "moe" else index

    def router_values(self, index: int) -> list[str]:
        """Inverse of router_index for dMoE: the attribute values routed by router ``index``."""
        out = []
        for attr in reversed(self.attributes):
            index, rem = divmod(index, len(attr.values))
            out.append(attr.values[rem])
        return out[::-1]

    # -- (de)serialisation ---------------------------------------------------------------------------------
    def validate(self) -> None:
        if self.format_version != FORMAT_VERSION:
            raise SpecError(
                f"spec format version {self.format_version} is not supported (this napari-dmoe reads version "
                f"{FORMAT_VERSION}); upgrade napari-dmoe or re-export the model"
            )
        from napari_dmoe.model.registry import arches

        if self.arch not in arches():
            raise SpecError(f"arch={self.arch!r}: expected one of {list(arches())}")
        if self.routing not in ROUTINGS:
            raise SpecError(f"routing={self.routing!r}: expected one of {list(ROUTINGS)}")
        if len(self.class_names) < 2:
            raise SpecError("class_names needs at least two entries (background first)")
        if not self.attributes or any(not a.values for a in self.attributes):
            raise SpecError("attributes needs at least one attribute with a non-empty vocabulary")
        for a in self.attributes:
            if len(set(a.values)) != len(a.values):
                raise SpecError(f"attribute {a.name!r} has repeated values {a.values}")
        if not 1 <= self.top_k <= self.n_experts:
            raise SpecError(f"top_k={self.top_k} must be between 1 and n_experts={self.n_experts}")
        if len(self.input_size) != self.spatial_dims:
            raise SpecError(f"input_size {self.input_size} must have {self.spatial_dims} entries for {self.arch}")
        if self.spacing is not None and len(self.spacing) != self.spatial_dims:
            raise SpecError(f"spacing {self.spacing} must have {self.spatial_dims} entries for {self.arch}")
        self._validate_local_experts()
        if not isinstance(self.router_mix, (int, float)) or not 0 <= self.router_mix < 1 or \
                (self.router_mix and (self.routing != "dmoe" or self.n_routers < 2)):
            raise SpecError(f"router_mix={self.router_mix!r}: a number in [0, 1), above 0 only for a dMoE model with "
                            "two or more routers")
        kind = self.normalization.get("kind")
        if kind not in NORMALIZATIONS:
            raise SpecError(f"normalization kind {kind!r}: expected one of {list(NORMALIZATIONS)}")
        if kind == "window" and not {"low", "high"} <= set(self.normalization):
            raise SpecError("normalization kind 'window' needs 'low' and 'high'")
        if self.trained_on is not None:
            if not isinstance(self.trained_on, Mapping):
                raise SpecError("trained_on must be an object (modality, spatial_dims, channels, intensity, spacing)")
            unknown = sorted(set(self.trained_on) - set(TRAINED_ON_KEYS))
            if unknown:
                raise SpecError(f"unknown trained_on field(s) {unknown}; expected some of {list(TRAINED_ON_KEYS)}")

    def _validate_local_experts(self) -> None:
        if self.local_experts is None:
            return
        ok = self.routing == "dmoe" and isinstance(self.local_experts, list) and all(
            isinstance(layer, list) and all(
                isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(v, int) for v in p)
                and 0 <= p[0] < self.n_routers and 0 <= p[1] < self.n_experts for p in layer)
            for layer in self.local_experts)
        if not ok:
            raise SpecError(f"local_experts {self.local_experts!r}: expected, for a dMoE model, one list per dMoE "
                            f"layer of [router < {self.n_routers}, expert < {self.n_experts}] pairs")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelSpec":
        if not isinstance(data, Mapping):
            raise SpecError("a model spec must be a JSON object")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise SpecError(
                f"spec format version {version!r} is not supported (this napari-dmoe reads version "
                f"{FORMAT_VERSION}); upgrade napari-dmoe or re-export the model"
            )
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(f"unknown spec field(s) {unknown}")
        required = {"arch", "class_names", "attributes"}
        missing = sorted(required - set(data))
        if missing:
            raise SpecError(f"spec is missing field(s) {missing}")
        try:
            return cls(**dict(data))
        except TypeError as err:  # wrong field types, e.g. attributes not a list of objects
            raise SpecError(f"spec fields have the wrong form: {err}") from None
