"""Which routers were trained, and what inference should use for the ones that were not (or barely).

A dMoE model has one router per attribute value, or per combination of values when it is conditioned on
several attributes (intersectional). A router sees gradients only from its own group's training cases, so a
combination absent or rare in training has an untrained router. The engine records in the model's provenance:

    spec.provenance["router_counts"]   = {"Asian/Female": 12, ...}    training cases per router (group name)
    spec.provenance["router_fallback"] = {"min_cases": 5, "routers": {"7": [6, 8], ...}}

``routers[str(i)]`` lists the routers whose predictions are averaged instead of router ``i``: the well-trained
routers (``>= min_cases``) that share the FIRST attribute's value with ``i``; if there is none, every
well-trained router. Routers with enough cases have no entry. ``fallback_routers(spec, i)`` reads it.
"""
from __future__ import annotations

from typing import Any, Mapping

from napari_dmoe.model.spec import ModelSpec


def router_counts(spec: ModelSpec, group_counts: Mapping[str, int]) -> dict[str, int]:
    """Training cases per router, keyed by group name ("v1/v2"); for MoE/baseline the total under "all"."""
    if spec.routing != "dmoe":
        return {"all": int(sum(group_counts.values()))}
    return {"/".join(spec.router_values(i)): int(group_counts.get("/".join(spec.router_values(i)), 0))
            for i in range(spec.n_routers)}


def fallback_table(spec: ModelSpec, counts: Mapping[str, int], min_cases: int) -> dict[str, Any]:
    """The ``router_fallback`` record described in the module docstring."""
    table: dict[str, list[int]] = {}
    if spec.routing == "dmoe":
        trained = [i for i in range(spec.n_routers) if counts.get("/".join(spec.router_values(i)), 0) >= min_cases]
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
