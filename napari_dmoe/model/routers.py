"""The patient attribute: its one value type, the groups a model knows, and which routers serve a patient.

A dMoE model has one router per attribute value, or per combination of values when it is conditioned on
several attributes (intersectional). A group is one such combination, named by its values joined with "/"
("Black", "Black/Female"); ``group_name`` and ``group_values`` are the only places that join and split it.

A router sees gradients only from its own group's training cases, so a combination absent or rare in training
has an untrained router. The engine records in the model's provenance:

    spec.provenance["router_counts"]   = {"Asian/Female": 12, ...}    training cases per router (group name)
    spec.provenance["router_fallback"] = {"min_cases": 5, "routers": {"7": [6, 8], ...}}

``routers[str(i)]`` lists the routers whose predictions are averaged instead of router ``i``: the well-trained
routers (``>= min_cases``) that share the FIRST attribute's value with ``i``; if there is none, every
well-trained router. Routers with enough cases have no entry. ``fallback_routers(spec, i)`` reads it.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple, Sequence

from napari_dmoe.model.spec import UNKNOWN, ModelSpec, SpecError, attribute_text, is_unknown

GROUP_SEPARATOR = "/"


class AttributeValueError(SpecError):
    """A patient attribute the model cannot take; the message names the value and the model's vocabulary."""


def group_name(values: Sequence[Any]) -> str:
    """Attribute values in the model's order -> group name ("Black", "Black/Female")."""
    return GROUP_SEPARATOR.join(str(v) for v in values)


def group_values(group: str) -> list[str]:
    """Group name -> attribute values in the model's order (the inverse of ``group_name``)."""
    return group.split(GROUP_SEPARATOR)


def all_groups(spec: ModelSpec) -> list[str]:
    """Every group of a model (each combination of attribute values), in router order."""
    return [group_name(c) for c in itertools.product(*[a.values for a in spec.attributes])]


@dataclass(frozen=True)
class PatientAttribute:
    """What is known of one patient: attribute name -> value, None where unknown. Every front end parses what
    the user gave into this (``parse``), and the engine resolves it to routers (``resolve_routers``)."""

    values: tuple[tuple[str, str | None], ...] = ()

    @classmethod
    def parse(cls, given: Any, spec: ModelSpec) -> "PatientAttribute":
        """``given``: None / "unknown", one value (a one-attribute model), a mapping name -> value, a list of
        ``-a`` arguments ("Black" or "race=Black"), or a PatientAttribute. Values are checked against the model."""
        names = [a.name for a in spec.attributes]
        if isinstance(given, PatientAttribute):
            given = given.mapping
        if isinstance(given, (list, tuple)):
            given = _from_arguments([str(v) for v in given], names)
        if is_unknown(given):
            mapping: dict[str, Any] = {n: None for n in names}
        elif isinstance(given, Mapping):
            extra = sorted(set(map(str, given)) - set(names))
            missing = [n for n in names if n not in given]
            if extra or (missing and spec.routing == "dmoe"):
                raise AttributeValueError(
                    f"attribute names {extra or missing} do not match this model's attributes {names}; give "
                    f"{vocabulary(spec)} (use 'unknown' for a value you do not know)")
            mapping = {n: given.get(n) for n in names}
        elif isinstance(given, (str, int)) and not isinstance(given, bool):
            if len(names) != 1:
                raise AttributeValueError(f"this model has {len(names)} attributes {names}: give a dict name -> "
                                          "value (or NAME=VALUE for each)")
            mapping = {names[0]: given}
        else:
            raise AttributeValueError(f"attribute must be a value, a dict name -> value or None, got "
                                      f"{type(given).__name__}")
        for attr in spec.attributes:
            v = mapping[attr.name]
            if is_unknown(v):
                mapping[attr.name] = None
            elif str(v) not in attr.values:
                raise AttributeValueError(f"{attr.name}={v!r} is not in this model's vocabulary {attr.values}; "
                                          f"valid: {vocabulary(spec)}")
            else:
                mapping[attr.name] = str(v)
        return cls(tuple(mapping.items()))

    @property
    def mapping(self) -> dict[str, str | None]:
        return dict(self.values)

    @property
    def known(self) -> bool:
        """Every value is known (one router serves the patient)."""
        return all(v is not None for _, v in self.values)

    @property
    def group(self) -> str:
        """The group name ("Black/Female"; "unknown" stands in for an unknown value)."""
        return group_name(UNKNOWN if v is None else v for _, v in self.values)

    @property
    def text(self) -> str:
        """"race=Black, sex=unknown": the one rendering for people."""
        return attribute_text(self.mapping)


def _from_arguments(values: list[str], names: list[str]) -> Any:
    """``-a`` arguments -> None, one value, or a mapping; conflicting repeats are refused."""
    if not values or values == [UNKNOWN]:
        return None
    pairs = [v.split("=", 1) for v in values]
    if len(values) == 1 and len(pairs[0]) == 1:
        return values[0]
    if any(len(p) == 1 for p in pairs):
        raise AttributeValueError("with several attributes, give each as NAME=VALUE (e.g. -a race=Black -a "
                                  "age=60-79)")
    out: dict[str, str] = {}
    for name, value in pairs:
        if name not in names:
            raise AttributeValueError(f"the model has no attribute {name!r}; its attributes are {names}")
        if name in out and out[name] != value:  # the last one silently winning would route the wrong patient
            raise AttributeValueError(f"conflicting values for attribute {name!r}: {out[name]!r} and {value!r}; "
                                      "give it once")
        out[name] = value
    return out


def vocabulary(spec: ModelSpec) -> str:
    """"race in ['Asian', 'Black', 'White']": what a refusal offers instead."""
    return ", ".join(f"{a.name} in {a.values}" for a in spec.attributes)


class Routers(NamedTuple):
    """The routers to run (their probabilities are averaged), the attribute used as a mapping name -> value
    (an unknown value reads "unknown (averaged over N values)"; shown as text by ``spec.attribute_text``), a note
    when an under-trained router was replaced by an average of trained ones ("" otherwise)."""

    indices: list[int]
    used: dict[str, str]
    note: str


def resolve_routers(spec: ModelSpec, attribute: Any, unknown: str = "average") -> Routers:
    """Which routers serve ``attribute`` (anything ``PatientAttribute.parse`` takes). Unknown values average
    over the routers that fit the known ones; ``unknown="error"`` refuses them instead."""
    if unknown not in ("average", "error"):
        raise AttributeValueError(f"unknown={unknown!r}: expected 'average' or 'error'")
    patient = PatientAttribute.parse(attribute, spec)
    names = [a.name for a in spec.attributes]
    if spec.routing != "dmoe":  # one router (plain MoE) or none: the attribute does not change the result
        note = "plain MoE: one router for everybody" if spec.routing == "moe" else "model without experts"
        return Routers([0], {n: f"not used ({note})" for n in names}, "")
    values = [v for _, v in patient.values]
    if not patient.known:
        if unknown == "error":
            raise AttributeValueError(f"no value for {[n for n, v in patient.values if v is None]}; this model "
                                      f"needs {vocabulary(spec)}")
        choices = [attr.values if v is None else [v] for attr, v in zip(spec.attributes, values)]
        routers = [spec.router_index(list(c)) for c in itertools.product(*choices)]
        used = {n: (f"{UNKNOWN} (averaged over {len(a.values)} values)" if v is None else v)
                for n, a, v in zip(names, spec.attributes, values)}
        return Routers(routers, used, "")
    index = spec.router_index(values)
    routers = fallback_routers(spec, index)  # (near) untrained routers fall back to averaging trained ones
    note = "" if routers == [index] else (f"the router of {patient.text} had too few training cases; "
                                         f"averaged over routers {routers}")
    return Routers(routers, patient.mapping, note)  # type: ignore[arg-type]


def router_counts(spec: ModelSpec, group_counts: Mapping[str, int]) -> dict[str, int]:
    """Training cases per router, keyed by group name; for MoE/baseline the total under "all"."""
    if spec.routing != "dmoe":
        return {"all": int(sum(group_counts.values()))}
    return {g: int(group_counts.get(g, 0)) for g in all_groups(spec)}


def fallback_table(spec: ModelSpec, counts: Mapping[str, int], min_cases: int) -> dict[str, Any]:
    """The ``router_fallback`` record described in the module docstring."""
    table: dict[str, list[int]] = {}
    if spec.routing == "dmoe":
        groups = all_groups(spec)
        trained = [i for i, g in enumerate(groups) if counts.get(g, 0) >= min_cases]
        for i in range(spec.n_routers):
            if i in trained or not trained:
                continue
            first = spec.router_values(i)[0]
            same = [j for j in trained if spec.router_values(j)[0] == first]
            table[str(i)] = same or trained
    return {"min_cases": int(min_cases), "routers": table}


def fallback_routers(spec: ModelSpec, index: int) -> list[int]:
    """Routers to use for router ``index``: ``[index]`` unless the training provenance says it was too rare."""
    table = (spec.provenance or {}).get("router_fallback", {}).get("routers", {})
    return [int(j) for j in table.get(str(index), [index])]


def default_attr(attr: Any, x: Any, moe: Any) -> Any:
    """A network's ``attr`` (router index per sample) may be left out only when there is at most one router
    (baseline or plain MoE): then every sample uses router 0."""
    import torch

    if attr is not None:
        return attr
    if moe is not None and moe[0].n_attr > 1:
        raise ValueError(f"this network has {moe[0].n_attr} attribute routers: pass attr (router index per sample)")
    return torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
