"""Training losses: 0.5 CE + 0.5 Dice, FEBS (FairSeg's fair error-bound scaling) and a Switch-style balance loss.

The Dice term follows the TransUNet/FairSeg code that dMoE trains with: softmax probabilities, background
included, squared prediction in the denominator, sums pooled over the whole batch per class, smoothing 1e-5 in
numerator and denominator, then the mean over classes. MONAI's ``DiceLoss(squared_pred=True, batch=True)``
computes exactly that, so we configure MONAI instead of writing our own.

FEBS, as in DESIGN.md section 2: for every group g present in the batch the (detached) Dice loss L_g of that
group's samples; weights ``w_g = tanh((min_g L_g / L_g) ** gamma)``; each sample's probabilities are multiplied
by its group's weight inside the Dice loss; total ``0.5 CE + 0.5 FEBS-Dice``.

Difference with the official FairSeg ``febs_loss``: it stores L_g in a vector over ALL groups (0 for a group
absent from the batch) and takes the minimum of that vector, so a single absent group makes the minimum 0 and
every weight ``tanh(0) = 0``: the FEBS term then has no gradient for that batch. We take the minimum over the
groups present in the batch only, which is what the method describes.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss as _MonaiDiceCELoss
from monai.losses import DiceLoss
from monai.networks.utils import one_hot
from torch import Tensor, nn

from napari_dmoe.model.moe import dmoe_layers

__all__ = [
    "LossInputError",
    "DiceCELoss",
    "FEBSLoss",
    "febs_weights",
    "load_balancing_loss",
    "router_spread",
    "moe_penalties",
    "reset_moe_losses",
    "build_loss",
]

_SMOOTH = 1e-5  # the official DiceLoss smoothing


class LossInputError(ValueError):
    """Logits, targets or groups that a loss cannot use."""


def _official_dice(reduction: str = "mean") -> DiceLoss:
    # Probabilities are computed by the caller (FEBS scales them before the Dice), so no softmax here.
    return DiceLoss(
        include_background=True,
        squared_pred=True,
        batch=True,
        smooth_nr=_SMOOTH,
        smooth_dr=_SMOOTH,
        reduction=reduction,
    )


def _check_inputs(logits: Tensor, target: Tensor, n_classes: int) -> Tensor:
    """Validate shapes and label range; return the target as int64 ``[B, 1, *spatial]``."""
    if logits.ndim < 3 or logits.shape[1] != n_classes:
        raise LossInputError(
            f"logits must be [batch, {n_classes} classes, *spatial], got shape {tuple(logits.shape)}; "
            "check the network's n_classes"
        )
    if target.ndim == logits.ndim - 1:
        target = target.unsqueeze(1)
    if target.shape[0] != logits.shape[0] or target.shape[1] != 1 or target.shape[2:] != logits.shape[2:]:
        raise LossInputError(
            f"target must be a label map [batch, *spatial] matching logits {tuple(logits.shape)}, "
            f"got {tuple(target.shape)}"
        )
    if target.is_floating_point() and not torch.equal(target, target.round()):
        raise LossInputError("target holds non-integer values; pass an integer label map (0 = background)")
    target = target.long()
    lo, hi = int(target.min()), int(target.max())
    if lo < 0 or hi >= n_classes:
        raise LossInputError(
            f"target labels span {lo}..{hi} but the loss has {n_classes} classes (0..{n_classes - 1}); "
            "map the dataset's labels to class indices first"
        )
    return target


def _group_codes(groups: Tensor | Sequence, batch: int) -> Tensor:
    """Map group labels (ints, strings, a tensor) to codes 0..G-1 in order of first sorted appearance."""
    if isinstance(groups, Tensor):
        values = groups.detach().cpu().reshape(-1).tolist()
    else:
        values = list(groups)
    if len(values) != batch:
        raise LossInputError(f"got {len(values)} group labels for a batch of {batch}; pass one group per sample")
    index = {g: i for i, g in enumerate(sorted(set(values), key=str))}
    return torch.tensor([index[g] for g in values], dtype=torch.long)


def febs_weights(per_sample_dice_loss: Tensor, groups: Tensor | Sequence, gamma: float = 1.0) -> Tensor:
    """FEBS weight of every sample: ``tanh((min_g L_g / L_g) ** gamma)`` for its group g.

    ``L_g`` is the mean of ``per_sample_dice_loss`` over the samples of group g; the minimum runs over the groups
    present in this batch only (see module docstring). The result is detached: the weights rescale, they are
    not trained through (the official code computes them in numpy).
    """
    losses = per_sample_dice_loss.detach().reshape(-1).float()
    codes = _group_codes(groups, losses.numel()).to(losses.device)
    n_groups = int(codes.max()) + 1
    sums = torch.zeros(n_groups, device=losses.device).index_add_(0, codes, losses)
    counts = torch.bincount(codes, minlength=n_groups).float()
    group_loss = (sums / counts).clamp_min(1e-8)  # a perfect group (L_g = 0) must not divide by zero
    weights = torch.tanh((group_loss.min() / group_loss) ** gamma)
    return weights[codes]


class DiceCELoss(nn.Module):
    """``ce_weight * CE + dice_weight * Dice`` on logits and an integer label map (0.5 / 0.5 by default).

    ``forward(logits [B, C, *spatial], target [B, *spatial] or [B, 1, *spatial], groups=None)``; ``groups`` is
    accepted and ignored so that every loss here has the same call.
    """

    def __init__(self, n_classes: int, ce_weight: float = 0.5, dice_weight: float = 0.5) -> None:
        super().__init__()
        self.n_classes = n_classes
        self.loss = _MonaiDiceCELoss(
            include_background=True,
            to_onehot_y=True,
            softmax=True,
            squared_pred=True,
            batch=True,
            smooth_nr=_SMOOTH,
            smooth_dr=_SMOOTH,
            lambda_dice=dice_weight,
            lambda_ce=ce_weight,
        )

    def forward(self, logits: Tensor, target: Tensor, groups: Tensor | Sequence | None = None) -> Tensor:
        target = _check_inputs(logits, target, self.n_classes)
        return self.loss(logits, target)


class FEBSLoss(nn.Module):
    """``ce_weight * CE + febs_weight * FEBS-Dice`` (FairSeg's fair error-bound scaling).

    ``forward(logits, target, groups)``: ``groups`` holds one label per sample (attribute index or name).
    """

    def __init__(self, n_classes: int, gamma: float = 1.0, ce_weight: float = 0.5, febs_weight: float = 0.5) -> None:
        super().__init__()
        self.n_classes = n_classes
        self.gamma = gamma
        self.ce_weight = ce_weight
        self.febs_weight = febs_weight
        self.dice = _official_dice()

    def sample_weights(self, probs: Tensor, onehot: Tensor, groups: Tensor | Sequence) -> Tensor:
        """Per-sample FEBS weights; L_g is the Dice loss pooled over group g's samples, as the official code."""
        codes = _group_codes(groups, probs.shape[0]).to(probs.device)
        per_sample = torch.empty(probs.shape[0], device=probs.device)
        with torch.no_grad():
            for g in codes.unique():
                mask = codes == g
                # Every sample carries its group's pooled loss, so the group mean in febs_weights is L_g itself.
                per_sample[mask] = self.dice(probs[mask], onehot[mask])
        return febs_weights(per_sample, codes, self.gamma)

    def febs_dice(self, logits: Tensor, target: Tensor, groups: Tensor | Sequence) -> Tensor:
        """The FEBS Dice term alone: Dice loss of group-weighted probabilities."""
        target = _check_inputs(logits, target, self.n_classes)
        probs = torch.softmax(logits, dim=1)
        onehot = one_hot(target, self.n_classes, dim=1)
        weights = self.sample_weights(probs, onehot, groups)
        scaled = probs * weights.view(-1, *([1] * (probs.ndim - 1)))
        return self.dice(scaled, onehot)

    def forward(self, logits: Tensor, target: Tensor, groups: Tensor | Sequence) -> Tensor:
        if groups is None:
            raise LossInputError("FEBS needs the group of every sample; pass groups (attribute per sample)")
        checked = _check_inputs(logits, target, self.n_classes)
        ce = F.cross_entropy(logits, checked[:, 0])
        return self.ce_weight * ce + self.febs_weight * self.febs_dice(logits, checked, groups)


def load_balancing_loss(gate_probs: Tensor, top_k: int = 1, expert_dim: int = -1) -> Tensor:
    """Switch-Transformer balance loss ``E * sum_i f_i * P_i`` (1.0 when balanced, E when collapsed).

    ``gate_probs``: gate weights per token with experts along ``expert_dim`` (e.g. ``[tokens, E]`` or the
    ``[B, E, *grid]`` of a RoutingRecord). ``f_i``: fraction of routing slots sent to expert i (top ``top_k`` per
    token, no gradient); ``P_i``: mean gate weight of expert i (carries the gradient). dMoE trains without it;
    it is an optional auxiliary term.
    """
    if gate_probs.ndim < 2:
        raise LossInputError(f"gate_probs needs a token and an expert axis, got shape {tuple(gate_probs.shape)}")
    probs = gate_probs.movedim(expert_dim, -1)
    n_experts = probs.shape[-1]
    if not 1 <= top_k <= n_experts:
        raise LossInputError(f"top_k={top_k} must be between 1 and the number of experts ({n_experts})")
    probs = probs.reshape(-1, n_experts)
    chosen = probs.detach().topk(top_k, dim=-1).indices.reshape(-1)
    fraction = torch.bincount(chosen, minlength=n_experts).float() / chosen.numel()
    mean_prob = probs.mean(dim=0)
    return n_experts * (fraction.to(mean_prob.device) * mean_prob).sum()


def reset_moe_losses(network: nn.Module) -> None:
    """Drop the balance-loss terms every dMoE layer collected (before a training forward)."""
    for m in dmoe_layers(network):
        m.reset_aux_losses()


def moe_penalties(network: nn.Module, aux_weight: float, smoothing: float) -> Tensor | float:
    """``aux_weight`` x the mean load-balancing loss over every dMoE call of the last forward (a shared layer
    counts once per block) + ``smoothing`` x the routers' spread (``router_spread``); 0.0 when both are off."""
    total: Tensor | float = 0.0
    terms = [t for m in dmoe_layers(network) for t in m.aux_losses]
    if aux_weight > 0 and terms:
        total = total + aux_weight * torch.stack(terms).mean()
    spread = router_spread(network) if smoothing > 0 else None
    return total if spread is None else total + smoothing * spread


def router_spread(network: nn.Module) -> Tensor | None:
    """How far the attribute routers of each dMoE layer sit from their mean: per layer, the mean over routers of
    the squared distance of a router's gate (weight and bias) from the routers' average gate; the mean over
    layers. ``router_smoothing`` times this in the loss pulls a rare group's router towards the others unless its
    own images say otherwise (issue 26). None without a layer of two or more routers."""
    terms = []
    for layer in dmoe_layers(network):
        if layer.n_attr < 2:
            continue
        gates = torch.stack([torch.cat([r.gate.weight.flatten(), r.gate.bias]) for r in layer.routers])
        terms.append((gates - gates.mean(0)).pow(2).sum(1).mean())
    return torch.stack(terms).mean() if terms else None


def build_loss(name: str, n_classes: int, gamma: float = 1.0) -> nn.Module:
    """``"dice_ce"`` or ``"febs"``; both are called as ``loss(logits, target, groups)``."""
    if name == "dice_ce":
        return DiceCELoss(n_classes)
    if name == "febs":
        return FEBSLoss(n_classes, gamma=gamma)
    raise LossInputError(f"unknown loss {name!r}; choose 'dice_ce' or 'febs'")
