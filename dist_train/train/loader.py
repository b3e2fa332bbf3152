"""The Trainer's DataLoader: `make_loader` whose workers outlive a preemption notice.

SLURM signals every process of a job step, DataLoader workers too; a worker that died of it would fail
its rank before the rank could checkpoint. The workers ignore notices (`preemption.ignore_in_worker`),
and fork with them held back (`preemption.WorkersIgnoreNotices`) so none arrives before they do.
"""

from __future__ import annotations

from torch.utils.data import IterableDataset

from dist_train.config import DataConfig
from dist_train.data.stream import Batch, make_loader
from dist_train.train.preemption import WorkersIgnoreNotices, ignore_in_worker


def training_loader(dataset: IterableDataset, cfg: DataConfig, pin_memory: bool,
                    timeout_s: float = 0) -> WorkersIgnoreNotices[Batch]:
    """`make_loader(dataset, cfg, pin_memory, timeout_s)` with workers that ignore notices."""
    return WorkersIgnoreNotices(make_loader(dataset, cfg, pin_memory, timeout_s, worker_init_fn=ignore_in_worker))
