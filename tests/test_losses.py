"""Losses against hand computations with plain torch ops on tiny tensors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from napari_dmoe.training.losses import (
    DiceCELoss,
    FEBSLoss,
    LossInputError,
    build_loss,
    febs_weights,
    load_balancing_loss,
)

SMOOTH = 1e-5


def hand_dice(probs: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """The official TransUNet/FairSeg Dice loss: squared denominator, pooled over the batch, mean over classes."""
    losses = []
    for c in range(probs.shape[1]):
        p, y = probs[:, c], onehot[:, c]
        losses.append(1 - (2 * (p * y).sum() + SMOOTH) / ((p * p).sum() + (y * y).sum() + SMOOTH))
    return torch.stack(losses).mean()


def batch(b: int = 4, c: int = 3, size: int = 6):
    logits = torch.randn(b, c, size, size)
    target = torch.randint(0, c, (b, size, size))
    return logits, target


def test_dice_ce_matches_hand_computation():
    logits, target = batch()
    onehot = F.one_hot(target, 3).permute(0, 3, 1, 2).float()
    expected = 0.5 * F.cross_entropy(logits, target) + 0.5 * hand_dice(torch.softmax(logits, 1), onehot)
    got = DiceCELoss(3)(logits, target)
    assert torch.allclose(got, expected, atol=1e-6)
    # A [B, 1, H, W] target gives the same value.
    assert torch.allclose(DiceCELoss(3)(logits, target[:, None]), expected, atol=1e-6)


def test_dice_ce_perfect_prediction_is_near_zero():
    target = torch.randint(0, 2, (2, 5, 5))
    logits = F.one_hot(target, 2).permute(0, 3, 1, 2).float() * 40 - 20
    assert DiceCELoss(2)(logits, target).item() < 1e-4


def test_febs_weights_two_groups_by_hand():
    losses = torch.tensor([0.2, 0.2, 0.4, 0.4, 0.1])
    groups = torch.tensor([0, 0, 1, 1, 2])
    w = febs_weights(losses, groups)
    # L_0 = 0.2, L_1 = 0.4, L_2 = 0.1 -> min 0.1
    expected = torch.tensor([math.tanh(0.5)] * 2 + [math.tanh(0.25)] * 2 + [math.tanh(1.0)])
    assert torch.allclose(w, expected, atol=1e-6)
    # Group means, not per-sample values, set the weight; gamma is an exponent.
    w2 = febs_weights(torch.tensor([0.1, 0.3, 0.4]), ["a", "a", "b"], gamma=2.0)
    assert torch.allclose(w2, torch.tensor([math.tanh(1.0)] * 2 + [math.tanh(0.25)]), atol=1e-6)


def test_febs_weights_absent_group_does_not_zero_weights():
    # Vocabulary of 3 groups, group 1 absent from this batch: the official code would give all zeros.
    w = febs_weights(torch.tensor([0.3, 0.6]), torch.tensor([0, 2]))
    assert torch.all(w > 0)
    assert torch.allclose(w, torch.tensor([math.tanh(1.0), math.tanh(0.5)]), atol=1e-6)


def test_febs_weights_zero_loss_group_is_finite():
    w = febs_weights(torch.tensor([0.0, 0.5]), [0, 1])
    assert torch.isfinite(w).all()
    assert w[0].item() == pytest.approx(math.tanh(1.0), abs=1e-6)


def test_febs_loss_matches_hand_computation_and_has_gradient():
    logits, target = batch(b=4, c=2, size=5)
    logits.requires_grad_(True)
    groups = torch.tensor([0, 1, 0, 1])
    probs = torch.softmax(logits, 1)
    onehot = F.one_hot(target, 2).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        l0 = hand_dice(probs[groups == 0], onehot[groups == 0])
        l1 = hand_dice(probs[groups == 1], onehot[groups == 1])
        low = torch.minimum(l0, l1)
        w = torch.stack([torch.tanh(low / l0), torch.tanh(low / l1)])[groups]
    expected = 0.5 * F.cross_entropy(logits, target) + 0.5 * hand_dice(probs * w[:, None, None, None], onehot)

    loss = FEBSLoss(2)(logits, target, groups)
    assert torch.allclose(loss, expected, atol=1e-6)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_febs_single_group_is_dice_of_scaled_probs_and_string_groups():
    logits, target = batch(b=2, c=2, size=4)
    probs = torch.softmax(logits, 1)
    onehot = F.one_hot(target, 2).permute(0, 3, 1, 2).float()
    expected = hand_dice(probs * math.tanh(1.0), onehot)
    got = FEBSLoss(2).febs_dice(logits, target, ["White", "White"])
    assert torch.allclose(got, expected, atol=1e-6)


def test_bad_inputs_give_clear_errors():
    logits, target = batch(c=3)
    with pytest.raises(LossInputError, match="classes"):
        DiceCELoss(2)(logits, target)
    with pytest.raises(LossInputError, match="labels span"):
        DiceCELoss(3)(logits, target + 3)
    with pytest.raises(LossInputError, match="group labels"):
        FEBSLoss(3)(logits, target, [0, 1])
    with pytest.raises(LossInputError, match="groups"):
        FEBSLoss(3)(logits, target, None)
    with pytest.raises(LossInputError, match="unknown loss"):
        build_loss("focal", 3)


def test_build_loss_returns_working_losses():
    logits, target = batch()
    groups = [0, 1, 1, 0]
    assert isinstance(build_loss("febs", 3), FEBSLoss)
    for name in ("dice_ce", "febs"):
        assert torch.isfinite(build_loss(name, 3)(logits, target, groups))


def test_load_balancing_loss_balanced_collapsed_and_gradient():
    n_tokens, n_experts = 64, 4
    balanced = torch.eye(n_experts).repeat(n_tokens // n_experts, 1)  # each expert gets 1/4 of the tokens
    assert load_balancing_loss(balanced).item() == pytest.approx(1.0)
    collapsed = torch.zeros(n_tokens, n_experts)
    collapsed[:, 0] = 1
    assert load_balancing_loss(collapsed).item() == pytest.approx(float(n_experts))
    # Experts on dim 1 of a [B, E, H, W] routing map, with top-2 and a gradient through P_i.
    logits = torch.randn(2, n_experts, 3, 3, requires_grad=True)
    value = load_balancing_loss(torch.softmax(logits, 1), top_k=2, expert_dim=1)
    value.backward()
    assert value.item() > 0 and logits.grad.abs().sum() > 0
    with pytest.raises(LossInputError, match="top_k"):
        load_balancing_loss(balanced, top_k=5)
