"""Losses on logits for the one-logit glaucoma classifier: focal loss and (positively) weighted BCE.

Both take raw logits, never probabilities: log-sigmoid of a logit is exact where log(sigmoid(x))
underflows to log(0) = -inf for confident wrong predictions, which is how a focal loss turns NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dist_train.config import LossConfig


class FocalLoss(nn.Module):
    """Binary focal loss (Lin et al. 2017), mean over the batch.

    loss = -alpha * y * (1 - p)^gamma * log(p) - (1 - alpha) * (1 - y) * p^gamma * log(1 - p),
    with p = sigmoid(logit); alpha weights the positives. Every factor is computed from log-sigmoids,
    (1 - p)^gamma as exp(gamma * logsigmoid(-x)), so logits of +-100 give finite losses and gradients.
    """

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0):
        super().__init__()
        self.alpha, self.gamma = alpha, gamma

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = targets.to(logits.dtype)
        log_p, log_not_p = F.logsigmoid(logits), F.logsigmoid(-logits)
        positive = self.alpha * targets * torch.exp(self.gamma * log_not_p) * log_p
        negative = (1 - self.alpha) * (1 - targets) * torch.exp(self.gamma * log_p) * log_not_p
        return -(positive + negative).mean()

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}"


class WeightedBCE(nn.Module):
    """Binary cross-entropy on logits with positives weighted by `pos_weight` (None: unweighted), mean."""

    pos_weight: torch.Tensor | None

    def __init__(self, pos_weight: float | None = None):
        super().__init__()
        weight = None if pos_weight is None else torch.tensor(float(pos_weight))
        # a non-persistent buffer follows .to(device) without entering any state dict
        self.register_buffer("pos_weight", weight, persistent=False)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        pos_weight = None if self.pos_weight is None else self.pos_weight.to(logits.dtype)
        return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), pos_weight=pos_weight)


def build_loss(cfg: LossConfig, positives: int | None = None, negatives: int | None = None) -> nn.Module:
    """The configured loss; `pos_weight: auto` needs the training set's class counts (from the manifest)."""
    if cfg.name == "focal":
        return FocalLoss(alpha=cfg.alpha, gamma=cfg.gamma)
    if cfg.pos_weight == "auto":
        return WeightedBCE(auto_pos_weight(positives, negatives))
    return WeightedBCE(cfg.pos_weight)


def auto_pos_weight(positives: int | None, negatives: int | None) -> float:
    """negatives / positives: a positive then weighs as much as all negatives together."""
    if positives is None or negatives is None:
        raise ValueError("loss.pos_weight: 'auto' needs the class counts of the training set, which are "
                         "unknown (no manifest?); set a number instead")
    if positives <= 0 or negatives <= 0:
        raise ValueError(f"loss.pos_weight: 'auto' needs both classes in the training set, "
                         f"got {positives} positives and {negatives} negatives")
    return negatives / positives
