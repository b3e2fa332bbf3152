"""Corrupt training samples: each logged once per epoch, counted over ranks, held to data.max_bad_fraction."""

from __future__ import annotations

import logging

import torch

from dist_train.data.stream import Batch
from dist_train.errors import DataError
from dist_train.train import distributed
from dist_train.train.distributed import DistEnv

log = logging.getLogger(__name__)


class BadSamples:
    def __init__(self, env: DistEnv, train_samples: int, max_fraction: float):
        self.env, self.train_samples, self.max_fraction = env, train_samples, max_fraction
        self.this_epoch: set[tuple[str, str]] = set()

    def note(self, batch: Batch) -> None:
        """Each corrupt sample once per epoch, however often a slot cycles past it."""
        for shard, key, reason in batch.bad:
            if (shard, key) not in self.this_epoch:
                log.warning("rank %d skipped corrupt sample %s in %s: %s", self.env.rank, key, shard, reason)
                self.this_epoch.add((shard, key))

    def end_epoch(self) -> int:
        """The epoch's corrupt samples over all ranks (slots are disjoint, so rank counts add up); DataError
        when they exceed data.max_bad_fraction of the training set."""
        bad = int(distributed.all_reduce_sum(self.env, torch.tensor([float(len(self.this_epoch))]))[0])
        self.this_epoch = set()
        if bad / max(self.train_samples, 1) > self.max_fraction:
            raise DataError(f"{bad} corrupt samples out of {self.train_samples} exceed "
                            f"data.max_bad_fraction={self.max_fraction}; the rank logs name each one")
        return bad
