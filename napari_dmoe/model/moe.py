"""dMoE layer: attribute-conditioned noisy top-k mixture of experts (arXiv 2502.00619).

One router per attribute value, eight shared experts. Every token of sample b is routed by router ``attr[b]``;
the output is the gate-weighted sum of its top-k experts. No capacity limit, no token dropping; the caller
adds the residual (``h = h + dmoe(h, attr)``).

Unlike the official ``SparseMoE`` (a Python loop over samples and one boolean mask per expert), routing here is
one batched matmul and expert dispatch is grouped: token slots are sorted by expert so each expert runs one
matmul pair on a contiguous slice.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


DISPATCH_CHUNK = 16384  # token slots per expert matmul pair
# With autograd on, gather-only dispatch (Experts._dispatch_train); False takes the inference path's
# index_select / index_add_ with autograd too (bench/bench_moe_layer.py --train compares the two)
GATHER_IN_TRAINING = True


class RoutingError(ValueError):
    """Bad input to a dMoE layer (shape or attribute index); the message says what to pass instead."""


@dataclass
class RoutingRecord:
    """Dense gate weights of one dMoE call: ``weights [B, E, *grid]`` (chosen experts sum to 1 over E)."""

    position: str
    weights: Tensor


def top_k_gates(logits: Tensor, noise_logits: Tensor | None, top_k: int) -> tuple[Tensor, Tensor]:
    """Noisy top-k gating: H = logits + N(0,1) * softplus(noise_logits); keep top k; softmax.

    Returns (indices [..., k], weights [..., k]). The softmax over the k kept logits equals the official
    softmax over E with the others set to -inf, without materialising the -inf tensor.
    """
    if noise_logits is not None:
        logits = logits + torch.randn_like(logits) * F.softplus(noise_logits)
    top_logits, indices = logits.topk(top_k, dim=-1)
    return indices, top_logits.softmax(dim=-1)


class NoisyTopKRouter(nn.Module):
    """One router: gate ``Linear(C, E)`` and noise ``Linear(C, E)``, both with bias."""

    def __init__(self, dim: int, n_experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(dim, n_experts)
        self.noise = nn.Linear(dim, n_experts)

    def forward(self, x: Tensor, noisy: bool = False) -> tuple[Tensor, Tensor]:
        return top_k_gates(self.gate(x), self.noise(x) if noisy else None, self.top_k)


class Expert(nn.Module):
    """Linear(C, 4C) -> ReLU -> Linear(4C, C) -> Dropout, as the official expert."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(F.relu(self.fc1(x), inplace=True)))


class _SlotGather(torch.autograd.Function):
    """``rows[s] = x[slot_token[s]]``: token rows into expert-sorted slots. Its backward is the adjoint, a gather
    back to token order and a sum over each token's k slots, where autograd's would scatter-add (``index_add_``)."""

    @staticmethod
    def forward(ctx, x: Tensor, slot_token: Tensor, inverse: Tensor, k: int) -> Tensor:
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x.index_select(0, slot_token)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse).view(-1, ctx.k, grad.shape[1]).sum(1), None, None, None


class _Permute(torch.autograd.Function):
    """``rows[perm]`` whose backward gathers with the inverse permutation (no scatter)."""

    @staticmethod
    def forward(ctx, rows: Tensor, perm: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(inverse)
        return rows.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class Experts(nn.ModuleList):
    """E shared experts with grouped (sorted) sparse dispatch."""

    def __init__(self, dim: int, n_experts: int = 8, dropout: float = 0.1, mlp_ratio: int = 4) -> None:
        super().__init__([Expert(dim, mlp_ratio * dim, dropout) for _ in range(n_experts)])

    def dispatch(self, x: Tensor, indices: Tensor, weights: Tensor, extra: Sequence[nn.Module] = ()) -> Tensor:
        """``x [T, C]``, chosen experts ``indices [T, k]`` and their ``weights [T, k]`` -> ``[T, C]``.

        ``extra``: more experts after these (a layer's local experts), indices ``len(self)...``."""
        experts = [*self, *extra]
        k = indices.shape[1]
        slot_expert = indices.reshape(-1)
        order = torch.argsort(slot_expert, stable=True)
        # One host sync for all experts (the official code syncs once per expert with `mask.any()`).
        counts = torch.bincount(slot_expert, minlength=len(experts)).tolist()
        if torch.is_grad_enabled() and GATHER_IN_TRAINING:
            return self._dispatch_train(experts, x, order, counts, weights)
        slot_token = order // k
        slot_weight = weights.reshape(-1, 1)[order]
        out: Tensor | None = None
        start = 0
        for expert, count in zip(experts, counts):
            # Chunks keep the temporaries small so the allocator reuses them: fresh multi-MB buffers cost page
            # faults that dominate at voxel-token sizes with few channels.
            for lo in range(start, start + count, DISPATCH_CHUNK):
                hi = min(lo + DISPATCH_CHUNK, start + count)
                tokens = slot_token[lo:hi]
                y = expert(x.index_select(0, tokens))
                y = y.mul_(slot_weight[lo:hi]) if not torch.is_grad_enabled() else y * slot_weight[lo:hi]
                if out is None:  # expert output dtype, which differs from x under autocast
                    out = torch.zeros(x.shape, dtype=y.dtype, device=x.device)
                # Each token gets exactly k adds into a zero; for k <= 2 float addition order cannot change the sum.
                out.index_add_(0, tokens, y)
            start += count
        return torch.zeros_like(x) if out is None else out

    @staticmethod
    def _dispatch_train(experts: list, x: Tensor, order: Tensor, counts: list[int], weights: Tensor) -> Tensor:
        """The dispatch with autograd: gathers only, forward and backward. Token rows are gathered once into
        expert order and the expert outputs gathered back, where per-chunk ``index_select`` / ``index_add_`` cost
        a token-sized zero tensor and a scatter per expert in backward (BENCHMARKS.md, "dMoE dispatch in
        training"). Experts no token chose run nothing and get no gradient. Bit-identical to the inference path."""
        t, k = weights.shape
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        rows = _SlotGather.apply(x, order // k, inverse, k)
        sizes, owners = [], []
        for e, count in enumerate(counts):
            for lo in range(0, count, DISPATCH_CHUNK):
                sizes.append(min(DISPATCH_CHUNK, count - lo))
                owners.append(experts[e])
        if not sizes:
            return torch.zeros_like(x)
        out = torch.cat([expert(piece) for expert, piece in zip(owners, rows.split(sizes))])
        out = _Permute.apply(out, inverse, order).view(t, k, -1)  # back to (token, choice) order
        # for k <= 2 the sum over choices adds the same two products as the scatter-add, so the result is the same
        return (out * weights.unsqueeze(-1)).sum(1)


class DMoE(nn.Module):
    """Distribution-aware MoE: one ``NoisyTopKRouter`` per attribute value, ``n_experts`` shared experts.

    ``forward(x [B, N, C], attr [B]) -> update [B, N, C]``. Noise is added in training, and in eval only when
    ``noisy_eval`` (the official behaviour). Set ``aux_loss_enabled = True`` to make every call append a
    load-balancing loss to ``aux_losses`` (off by default: the paper uses none). One instance may be called by
    several blocks (the TransUNet shares one dMoE), so the terms accumulate until ``reset_aux_losses()``;
    ``last_aux_loss`` is their mean (None when empty).
    """

    def __init__(
        self, dim: int, n_attr: int, n_experts: int = 8, top_k: int = 2, dropout: float = 0.1, noisy_eval: bool = False
    ) -> None:
        super().__init__()
        if n_attr < 1:
            raise ValueError(f"a dMoE layer needs at least one router, got n_attr={n_attr}")
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k={top_k} must be between 1 and n_experts={n_experts}")
        self.dim, self.n_experts, self.top_k, self.noisy_eval = dim, n_experts, top_k, noisy_eval
        self.dropout = dropout
        self.routers = nn.ModuleList([NoisyTopKRouter(dim, n_experts, top_k) for _ in range(n_attr)])
        self.experts = Experts(dim, n_experts, dropout)
        # Local experts (group-local fine-tuning): slot i is router local_table[i][0]'s private copy of shared
        # expert local_table[i][1]. Only that router's choice of that expert is redirected to it, so every other
        # router computes exactly what it did before. Absent (None) in ordinary models: old files load unchanged.
        self.local_table: list[tuple[int, int]] = []
        self.local_experts: Experts | None = None
        self.aux_loss_enabled = False
        self.aux_losses: list[Tensor] = []
        self._routing_sink: list[RoutingRecord] | None = None
        self.shared_router: NoisyTopKRouter | None = None  # add_shared_router; None in ordinary models
        self.router_mix = 0.0

    @property
    def last_aux_loss(self) -> Tensor | None:
        """Mean load-balancing loss over the calls since the last reset (every block sharing this layer)."""
        return torch.stack(self.aux_losses).mean() if self.aux_losses else None

    def reset_aux_losses(self) -> None:
        self.aux_losses = []

    @property
    def n_attr(self) -> int:
        return len(self.routers)

    def _check(self, x: Tensor, attr: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise RoutingError(f"dMoE expects tokens [B, N, {self.dim}], got shape {tuple(x.shape)}")
        attr = torch.as_tensor(attr, device=x.device).long().reshape(-1)
        if attr.shape[0] != x.shape[0]:
            raise RoutingError(f"attr has {attr.shape[0]} entries for a batch of {x.shape[0]}: give one per sample")
        lo, hi = int(attr.min()), int(attr.max())
        if lo < 0 or hi >= self.n_attr:
            raise RoutingError(
                f"attribute index {hi if hi >= self.n_attr else lo} is out of range: this layer has "
                f"{self.n_attr} router(s), indices 0..{self.n_attr - 1}"
            )
        return attr

    def router_logits(self, x: Tensor, attr: Tensor) -> tuple[Tensor, Tensor]:
        """Gate and noise logits ``[B, N, E]`` each, every sample through its own router, in one batched matmul."""
        e = self.n_experts
        # Stacking R tiny Linear layers per call is cheap and keeps the official ModuleList key layout.
        weight = torch.stack([torch.cat([r.gate.weight, r.noise.weight]) for r in self.routers])  # [R, 2E, C]
        bias = torch.stack([torch.cat([r.gate.bias, r.noise.bias]) for r in self.routers])  # [R, 2E]
        if self.shared_router is not None:  # logits are linear in the weights: mixing weights mixes logits
            s = self.shared_router
            weight = torch.lerp(weight, torch.cat([s.gate.weight, s.noise.weight]), self.router_mix)
            bias = torch.lerp(bias, torch.cat([s.gate.bias, s.noise.bias]), self.router_mix)
        logits = torch.baddbmm(bias[attr].unsqueeze(1), x, weight[attr].transpose(1, 2))
        return logits[..., :e], logits[..., e:]

    # Eager under torch.compile (keep_eager_under_compile, called before compiling): the per-expert token counts are
    # data and the position name differs per call, so a compiled graph would be rebuilt again and again.
    def forward(
        self, x: Tensor, attr: Tensor, *, position: str | None = None, grid: Sequence[int] | None = None
    ) -> Tensor:
        attr = self._check(x, attr)
        b, n, c = x.shape
        gate_logits, noise_logits = self.router_logits(x, attr)
        noisy = self.training or self.noisy_eval
        indices, weights = top_k_gates(gate_logits, noise_logits if noisy else None, self.top_k)
        chosen, extra = indices, ()
        if self.local_experts is not None:  # the adapted routers' picks of a copied expert go to their copy
            if self._local_remap.device != attr.device:
                self._local_remap = self._local_remap.to(attr.device)
            chosen = self._local_remap[attr].unsqueeze(1).expand(b, n, -1).gather(-1, indices)
            extra = self.local_experts
        out = self.experts.dispatch(x.reshape(b * n, c), chosen.reshape(b * n, -1), weights.reshape(b * n, -1),
                                    extra)
        if self._routing_sink is not None:
            self._record(indices, weights, position, grid)
        if self.aux_loss_enabled:
            self.aux_losses.append(self._balance_loss(gate_logits, indices))
        return out.view(b, n, c)

    def add_shared_router(self, mix: float) -> None:
        """Give the layer a router every group shares, mixed into each group's: gate and noise logits become
        (1 - mix) x the group router's + mix x the shared router's (issue 26: a rare group's routing leans on what
        every image taught, not only its own few). Group-local fine-tunes keep it frozen, so each group still
        depends only on its own router and this one."""
        if not 0 < mix < 1:
            raise ValueError(f"router mix must be in (0, 1), got {mix}")
        if self.n_attr < 2:
            raise ValueError("a shared router needs a dMoE layer with two or more routers")
        self.shared_router = NoisyTopKRouter(self.dim, self.n_experts, self.top_k)
        self.router_mix = float(mix)

    def add_local_experts(self, pairs: Sequence[tuple[int, int]], copy: bool = True) -> None:
        """Give router ``r`` a private copy of shared expert ``e`` for each ``(r, e)`` in ``pairs`` (appended
        after the existing ones). ``copy`` starts each from the shared expert's weights (a fine-tune starts
        from the base model's outputs exactly); without it the weights are fresh (a model file fills them)."""
        pairs = [(int(r), int(e)) for r, e in pairs]
        for r, e in pairs:
            if not (0 <= r < self.n_attr and 0 <= e < self.n_experts):
                raise ValueError(f"local expert (router {r}, expert {e}) is out of range: this layer has "
                                 f"{self.n_attr} router(s) and {self.n_experts} experts")
            if (r, e) in self.local_table or pairs.count((r, e)) > 1:
                raise ValueError(f"router {r} already has a local copy of expert {e}")
        if not pairs:
            return
        if self.local_experts is None:
            self.local_experts = Experts(self.dim, 0, self.dropout)
        device = self.experts[0].fc1.weight.device
        for r, e in pairs:
            expert = Expert(self.dim, self.experts[e].fc1.out_features, self.dropout).to(device).train(self.training)
            if copy:
                expert.load_state_dict(self.experts[e].state_dict())
            self.local_experts.append(expert)
        self.local_table += pairs
        remap = torch.arange(self.n_experts, device="cpu").repeat(self.n_attr, 1)  # not meta when sized there
        for slot, (r, e) in enumerate(self.local_table):
            remap[r, e] = self.n_experts + slot
        # derived from local_table (the spec): a plain attribute, neither saved nor counted as a buffer
        self._local_remap = remap

    def local_parameters(self, routers: Sequence[int]) -> Iterator[nn.Parameter]:
        """Parameters of the local experts that belong to ``routers``."""
        for (r, _), expert in zip(self.local_table, self.local_experts or ()):
            if r in routers:
                yield from expert.parameters()

    def dense_gates(self, indices: Tensor, weights: Tensor) -> Tensor:
        """Top-k (indices, weights) -> dense ``[..., E]`` gate weights (zeros for unchosen experts)."""
        shape = (*indices.shape[:-1], self.n_experts)
        return torch.zeros(shape, dtype=weights.dtype, device=weights.device).scatter(-1, indices, weights)

    def _record(self, indices: Tensor, weights: Tensor, position: str | None, grid: Sequence[int] | None) -> None:
        b, n = indices.shape[:2]
        grid = tuple(grid) if grid is not None else (n,)
        dense = self.dense_gates(indices.detach(), weights.detach())
        dense = dense.view(b, *grid, self.n_experts).movedim(-1, 1).contiguous()
        self._routing_sink.append(RoutingRecord(position or f"moe{len(self._routing_sink)}", dense))

    def _balance_loss(self, gate_logits: Tensor, indices: Tensor) -> Tensor:
        # Switch-Transformer style: E * sum_e (fraction of slots sent to e) * (mean router probability of e).
        probs = gate_logits.softmax(dim=-1).reshape(-1, self.n_experts).mean(dim=0)
        counts = torch.bincount(indices.reshape(-1), minlength=self.n_experts).to(probs.dtype)
        return self.n_experts * (counts / counts.sum() * probs).sum()


@contextlib.contextmanager
def capture_routing(network: nn.Module) -> Iterator[list[RoutingRecord]]:
    """Collect a RoutingRecord for every dMoE call inside the block; numerics are unchanged."""
    records: list[RoutingRecord] = []
    layers = [m for m in network.modules() if isinstance(m, DMoE)]
    previous = [m._routing_sink for m in layers]
    for m in layers:
        m._routing_sink = records
    try:
        yield records
    finally:
        for m, sink in zip(layers, previous):
            m._routing_sink = sink


def dmoe_layers(network: nn.Module) -> list[DMoE]:
    """The network's dMoE layers, each once (a shared layer counts once), in registration order."""
    return [m for m in network.modules() if isinstance(m, DMoE)]


def local_expert_table(network: nn.Module) -> list[list[list[int]]] | None:
    """Per dMoE layer, the ``[router, shared expert]`` pairs that have a local copy; None when there are none
    (what ``ModelSpec.local_experts`` records)."""
    tables = [[list(p) for p in m.local_table] for m in dmoe_layers(network)]
    return tables if any(tables) else None


def apply_router_mix(network: nn.Module, mix: float) -> nn.Module:
    """Give every dMoE layer a shared router mixed in at ``mix`` (0: none); returns ``network``."""
    if mix:
        for layer in dmoe_layers(network):
            layer.add_shared_router(mix)
    return network


def apply_local_experts(network: nn.Module, tables: Sequence[Sequence[Sequence[int]]] | None) -> nn.Module:
    """Add the local experts a model file records (fresh weights, filled by loading); returns ``network``."""
    if not tables:
        return network
    layers = dmoe_layers(network)
    if len(tables) != len(layers):
        raise ValueError(f"local_experts lists {len(tables)} dMoE layer(s), the network has {len(layers)}")
    for layer, pairs in zip(layers, tables):
        layer.add_local_experts([tuple(p) for p in pairs], copy=False)
    return network


def keep_eager_under_compile() -> None:
    """Run every DMoE layer eagerly under ``torch.compile`` (the rest of the network compiles). Applied right before
    compiling, not as a decorator: ``torch.compiler.disable`` imports ``torch._dynamo``, about a second of every
    ``dmoe`` start and every first mask that never compiles."""
    if not getattr(DMoE.forward, "_dmoe_eager", False):
        DMoE.forward = torch.compiler.disable(DMoE.forward)
        DMoE.forward._dmoe_eager = True  # type: ignore[attr-defined]
