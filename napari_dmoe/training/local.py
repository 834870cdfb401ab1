"""Group-local fine-tuning (``trainable: group_local``): adapt some groups, leave every other group bit for bit.

What trains: the routers of the adapted groups (``adapt_groups``; default: the groups that have training cases)
and, in every dMoE layer, ``local_experts`` private copies of the shared experts each of those routers uses most
on the training cases (``DMoE.add_local_experts``): that router's picks of such an expert go to its copy. The
copies start equal to the shared experts, so training starts from the base model's outputs exactly. Everything
shared is frozen, and every norm layer stays in eval mode: BatchNorm running statistics move in train mode even
when its weights are frozen, which would change every group. No other router can reach a local expert, so the
outputs of every other group are the base model's, bit for bit.

The other modes: ``routers_experts`` trains every router and the shared experts (norm layers in eval mode too);
``all`` trains everything, and may change every group.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from napari_dmoe.model.moe import dmoe_layers, local_expert_table
from napari_dmoe.model.spec import ModelSpec
from napari_dmoe.training.config import ConfigError
from napari_dmoe.model.routers import all_groups

NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.LayerNorm, nn.GroupNorm)
USAGE_ITEMS = 16  # training items whose routing picks the experts to copy


def set_train_mode(network: nn.Module, trainable: str) -> None:
    """Train mode, except the norm layers when their weights are frozen (their running statistics must not move)."""
    network.train()
    if trainable != "all":
        for m in network.modules():
            if isinstance(m, NORM_LAYERS):
                m.eval()


def group_names(spec: ModelSpec) -> list[str]:
    """Router index -> group name ("Black", or "Black/Female" for intersectional models)."""
    return all_groups(spec)


def adapted_routers(spec: ModelSpec, adapt_groups: Sequence[str] | None, train_groups: Mapping[str, int]) -> list[int]:
    """Routers to adapt: ``adapt_groups`` or, when None, every group (combination) with training cases."""
    names = group_names(spec)
    present = [g for g, n in train_groups.items() if n > 0]
    groups = [str(g) for g in adapt_groups] if adapt_groups else present
    unknown = [g for g in groups if g not in names]
    if unknown:
        raise ConfigError(f"config key 'adapt_groups': {unknown} are not groups of this model; expected names "
                          f"from {names}")
    outside = [g for g in present if g not in groups]
    if outside:
        raise ConfigError(f"config key 'adapt_groups': the training split has cases of {outside}, which a "
                          "group-local fine-tune would not learn from; add them to adapt_groups or drop those cases")
    return sorted({names.index(g) for g in groups})


def expert_usage(network: nn.Module, items: Any, n: int = USAGE_ITEMS) -> list[torch.Tensor]:
    """Per dMoE layer, the summed gate weight each router gives each expert ``[routers, experts]`` over the first
    ``n`` items (``{"image", "attr"}``), every position of a shared layer counted."""
    layers = dmoe_layers(network)
    sinks: list[list[Any]] = [[] for _ in layers]
    usage = [torch.zeros(m.n_attr, m.n_experts, dtype=torch.float64) for m in layers]
    was_training = network.training
    network.eval()
    try:
        for layer, sink in zip(layers, sinks):
            layer._routing_sink = sink
        with torch.no_grad():
            for i in range(min(n, len(items))):
                item = items[i]
                x = torch.as_tensor(item["image"]).unsqueeze(0)
                router = int(item["attr"])
                network(x, torch.tensor([router]))
                for use, sink in zip(usage, sinks):
                    for record in sink:
                        use[router] += record.weights[0].flatten(1).sum(1).double()
                    sink.clear()
    finally:
        for layer in layers:
            layer._routing_sink = None
        network.train(was_training)
    return usage


def prepare_group_local(network: nn.Module, spec: ModelSpec, routers: Sequence[int], items: Any,
                        n_local: int) -> dict[str, Any]:
    """Add the local experts, freeze everything else, record the table in ``spec.local_experts``; returns the
    provenance of the adaptation. A router that already has local experts (an earlier group-local fine-tune)
    keeps and trains them."""
    layers = dmoe_layers(network)
    if spec.routing != "dmoe" or not layers:
        raise ConfigError("config key 'trainable': group_local needs a dMoE model (one router per group)")
    if not 0 <= n_local <= spec.n_experts:
        raise ConfigError(f"config key 'local_experts': must be between 0 and {spec.n_experts}, got {n_local}")
    added = []
    if n_local:
        for layer, use in zip(layers, expert_usage(network, items)):
            owned = {r for r, _ in layer.local_table}
            pairs = [(r, int(e)) for r in routers if r not in owned
                     for e in torch.argsort(use[r], descending=True, stable=True)[:n_local]]
            layer.add_local_experts(pairs, copy=True)
            added.append([list(p) for p in pairs])
    spec.local_experts = local_expert_table(network)
    for p in network.parameters():
        p.requires_grad_(False)
    for layer in layers:
        for r in routers:
            for p in layer.routers[r].parameters():
                p.requires_grad_(True)
        for p in layer.local_parameters(routers):
            p.requires_grad_(True)
    names = group_names(spec)
    return {"mode": "group_local", "groups": [names[r] for r in routers], "routers": list(routers),
            "local_experts_per_layer": n_local, "local_experts_added": added,
            "trainable_parameters": sum(p.numel() for p in network.parameters() if p.requires_grad)}


def describe_adaptation(config: Mapping[str, Any], spec: ModelSpec, group_local: Mapping[str, Any] | None
                        ) -> dict[str, Any]:
    """The ``adaptation`` provenance record: which groups were adapted and how (``dmoe info`` prints it)."""
    mode = config["trainable"]
    if group_local is not None:
        others = [g for g in group_names(spec) if g not in group_local["groups"]]
        return {**group_local, "norm_layers": "eval (frozen statistics)", "unchanged_groups": others,
                "other_groups": "bitwise unchanged (shared weights frozen, no access to the local experts)"}
    return {"mode": mode, "groups": group_names(spec) if spec.routing == "dmoe" else ["all"],
            "norm_layers": "train" if mode == "all" else "eval (frozen statistics)",
            "other_groups": "may change (shared weights trained)"}


def inherit_local_experts(spec: ModelSpec, base_model: str | None) -> None:
    """A fine-tune of a group-locally fine-tuned model keeps its local experts (so their weights load), and a dMoE
    fine-tune of a model with a shared router keeps that router and its mix (else every group's routing would
    change)."""
    if base_model:
        from napari_dmoe.io.checkpoint import read_spec

        base = read_spec(base_model)
        spec.local_experts = base.local_experts
        if spec.routing == "dmoe" and base.router_mix:
            if spec.router_mix not in (0, base.router_mix):
                raise ConfigError(f"config key 'model.router_mix': {spec.router_mix} differs from the base model's "
                                  f"{base.router_mix} ({base_model}); leave it out to keep the base's")
            spec.router_mix = base.router_mix


def with_base_counts(counts: dict[str, int], base_model: str | None) -> dict[str, int] | None:
    """A fine-tune's training cases per router: its own plus the base model's. The router fallback is decided from
    these; from the fine-tune's cases alone, every group it has no case of would count as untrained and be
    answered by the corrected groups' routers at inference. None: the base records no counts (every router of
    it is then taken as trained)."""
    if not base_model:
        return counts
    from napari_dmoe.io.checkpoint import read_spec

    prior = read_spec(base_model).provenance.get("router_counts")
    if not isinstance(prior, dict) or set(prior) - set(counts) - {"all"}:
        return None
    return {g: int(n) + int(prior.get(g, 0)) for g, n in counts.items()}
