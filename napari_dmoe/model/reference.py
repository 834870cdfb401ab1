"""Slow but obvious versions of the dMoE layer, used as numerical references in tests and benchmarks.

``loop_dmoe`` follows the official ``SparseMoE`` algorithm step by step (one router call per sample, softmax over
E with -inf for unchosen experts, one boolean mask per expert); ``dense_dmoe`` runs every expert on every token.
Both read the parameters of a ``DMoE`` module, so they can be compared with it directly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from napari_dmoe.model.moe import DMoE


def loop_gates(moe: DMoE, x: Tensor, attr: Tensor, noisy: bool = False) -> tuple[Tensor, Tensor]:
    """Per-sample routing as the official code: dense gates ``[B, N, E]`` and indices ``[B, N, k]``."""
    gates, indices = [], []
    for x_b, a in zip(x, attr.tolist()):
        router = moe.routers[a]
        logits = router.gate(x_b)
        if noisy:
            logits = logits + torch.randn_like(logits) * F.softplus(router.noise(x_b))
        top_logits, idx = logits.topk(moe.top_k, dim=-1)
        sparse = torch.full_like(logits, float("-inf")).scatter(-1, idx, top_logits)
        gates.append(F.softmax(sparse, dim=-1))
        indices.append(idx)
    return torch.stack(gates), torch.stack(indices)


def loop_dmoe(moe: DMoE, x: Tensor, attr: Tensor, noisy: bool = False) -> Tensor:
    """The official per-sample-loop, per-expert-mask algorithm on ``moe``'s parameters."""
    gates, indices = loop_gates(moe, x, attr, noisy)
    out = torch.zeros_like(x)
    flat_x = x.reshape(-1, x.shape[-1])
    flat_gates = gates.reshape(-1, gates.shape[-1])
    for i, expert in enumerate(moe.experts):
        mask = (indices == i).any(dim=-1)
        flat_mask = mask.view(-1)
        if flat_mask.any():
            y = expert(flat_x[flat_mask]) * flat_gates[flat_mask, i].unsqueeze(1)
            out[mask] += y
    return out


def dense_dmoe(moe: DMoE, x: Tensor, attr: Tensor) -> Tensor:
    """Every expert on every token, weighted by the (noise-free) dense gates: the cost a sparse layer avoids."""
    gate_logits, _ = moe.router_logits(x, attr.to(x.device).long())
    top_logits, idx = gate_logits.topk(moe.top_k, dim=-1)
    gates = torch.zeros_like(gate_logits).scatter(-1, idx, top_logits.softmax(-1))
    out = torch.zeros_like(x)
    for i, expert in enumerate(moe.experts):
        out += expert(x) * gates[..., i : i + 1]
    return out
