"""dist_train/model/losses.py: focal loss against an independent reference, stability, weighted BCE, accumulation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dist_train.config import LossConfig, ModelConfig
from dist_train.model.losses import FocalLoss, WeightedBCE, build_loss
from dist_train.model.network import build_model


def reference_focal(logits: torch.Tensor, targets: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """The textbook formula, written directly (fine in float64 for moderate logits)."""
    p = torch.sigmoid(logits)
    positive = -alpha * targets * (1 - p) ** gamma * torch.log(p)
    negative = -(1 - alpha) * (1 - targets) * p ** gamma * torch.log(1 - p)
    return (positive + negative).mean()


def sample(count: int = 32, seed: int = 0, soft: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(count, generator=generator, dtype=torch.float64) * 3
    targets = torch.rand(count, generator=generator, dtype=torch.float64) if soft else \
        (torch.rand(count, generator=generator) < 0.3).double()
    return logits, targets


def test_gamma_zero_is_alpha_weighted_bce():
    logits, targets = sample()
    weights = 0.25 * targets + 0.75 * (1 - targets)
    expected = F.binary_cross_entropy_with_logits(logits, targets, weight=weights)
    torch.testing.assert_close(FocalLoss(alpha=0.25, gamma=0.0)(logits, targets), expected)


@pytest.mark.parametrize("alpha,gamma,soft", [(0.25, 2.0, False), (0.6, 1.5, True), (0.5, 0.5, False)])
def test_loss_and_gradient_match_float64_reference(alpha, gamma, soft):
    logits, targets = sample(soft=soft)
    ours_input = logits.clone().requires_grad_(True)
    reference_input = logits.clone().requires_grad_(True)
    ours = FocalLoss(alpha, gamma)(ours_input, targets)
    reference = reference_focal(reference_input, targets, alpha, gamma)
    ours.backward()
    reference.backward()
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ours_input.grad, reference_input.grad, rtol=1e-10, atol=1e-14)


def test_gradcheck_focal():
    logits, targets = sample(count=8, seed=3)
    loss = FocalLoss(alpha=0.3, gamma=2.0)
    assert torch.autograd.gradcheck(lambda x: loss(x, targets), (logits.requires_grad_(True),))


@pytest.mark.parametrize("loss", [FocalLoss(0.25, 2.0), FocalLoss(0.75, 0.0), WeightedBCE(9.0), WeightedBCE()])
def test_extreme_logits_stay_finite(loss):
    logits = torch.tensor([-100.0, 100.0, -100.0, 100.0], requires_grad=True)
    targets = torch.tensor([0.0, 0.0, 1.0, 1.0])
    value = loss(logits, targets)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()
    assert value.item() > 10  # the two confident mistakes dominate


def test_weighted_bce_weights_positives():
    logits, targets = sample()
    p = torch.sigmoid(logits)
    expected = -(3.0 * targets * torch.log(p) + (1 - targets) * torch.log(1 - p)).mean()
    torch.testing.assert_close(WeightedBCE(3.0)(logits, targets), expected)


def test_build_loss_auto_pos_weight():
    loss = build_loss(LossConfig(name="bce", pos_weight="auto"), positives=10, negatives=90)
    assert isinstance(loss, WeightedBCE) and loss.pos_weight.item() == pytest.approx(9.0)
    logits, targets = sample()
    expected = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=torch.tensor(9.0, dtype=torch.float64))
    torch.testing.assert_close(loss(logits, targets), expected)
    assert build_loss(LossConfig(name="bce"), None, None).pos_weight is None
    focal = build_loss(LossConfig(name="focal", alpha=0.4, gamma=1.0), None, None)
    assert isinstance(focal, FocalLoss) and (focal.alpha, focal.gamma) == (0.4, 1.0)


@pytest.mark.parametrize("positives,negatives", [(None, None), (0, 100), (5, None)])
def test_auto_pos_weight_needs_counts(positives, negatives):
    with pytest.raises(ValueError, match="loss.pos_weight"):
        build_loss(LossConfig(name="bce", pos_weight="auto"), positives, negatives)


@pytest.mark.parametrize("loss", [FocalLoss(0.25, 2.0), WeightedBCE(4.0)])
def test_accumulated_micro_batch_gradients_equal_one_big_batch(loss):
    """k micro-batches with loss / k sum to the gradient of one k-times batch (BN in eval mode)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="test_efficientnet", head_widths=[8], head_dropout=[0.0]))
    model = model.double().eval()
    images = torch.randn(8, 3, 32, 32, dtype=torch.float64)
    targets = torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 1], dtype=torch.float64)
    loss(model(images), targets).backward()
    big_batch = {name: param.grad.clone() for name, param in model.named_parameters()}
    model.zero_grad()
    for chunk_images, chunk_targets in zip(images.chunk(4), targets.chunk(4)):
        (loss(model(chunk_images), chunk_targets) / 4).backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, big_batch[name], rtol=1e-6, atol=1e-12, msg=name)
