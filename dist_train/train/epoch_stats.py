"""One epoch's training figures, summed on the device and reduced over ranks once at the epoch's end."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dist_train.train import distributed
from dist_train.train.distributed import DistEnv


@dataclass
class EpochStats:
    """One epoch's training figures, summed over ranks."""

    loss_sum: float = 0.0
    samples: int = 0
    positives: int = 0
    predicted_positives: int = 0
    true_positives: int = 0


class EpochSums:
    """Per-rank sums kept on the device: adding a micro-batch never waits for the GPU."""

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(5, dtype=torch.float64, device=device)

    def add(self, logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor) -> None:
        predicted, truth = logits.detach() > 0, labels > 0.5
        count = torch.full((), len(labels), dtype=torch.float64, device=self.sums.device)
        self.sums += torch.stack([loss.detach().double() * count, count, truth.sum().double(),
                                  predicted.sum().double(), (predicted & truth).sum().double()])

    def reduced(self, env: DistEnv) -> EpochStats:
        total = distributed.all_reduce_sum(env, self.sums).tolist()
        return EpochStats(total[0], *(int(v) for v in total[1:]))
