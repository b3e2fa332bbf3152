"""The Trainer's DataLoader: `make_loader` whose workers outlive a preemption notice and report a stall.

SLURM signals every process of a job step, DataLoader workers too; a worker that died of it would fail
its rank before the rank could checkpoint. The workers ignore notices (`preemption.ignore_in_worker`),
and fork with them held back (`preemption.WorkersIgnoreNotices`) so none arrives before they do.

A worker that produces nothing for `engine.timeout_s` makes its rank's DataLoader raise, saying only that
it timed out. Each worker therefore prints its own Python stack (faulthandler) when one item takes 90% of
that: the rank's log then says where the worker was stuck.
"""

from __future__ import annotations

import faulthandler
import sys
from collections.abc import Iterator
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from dist_train.config import DataConfig
from dist_train.data.stream import Batch, make_loader
from dist_train.train.preemption import WorkersIgnoreNotices, ignore_in_worker

STALL_FRACTION = 0.9
"""Of the DataLoader's timeout: when a worker stuck on one item prints its stack, before its rank gives up."""


def training_loader(dataset: IterableDataset, cfg: DataConfig, pin_memory: bool,
                    timeout_s: float = 0) -> WorkersIgnoreNotices[Batch]:
    """`make_loader(dataset, cfg, pin_memory, timeout_s)` with workers that ignore notices and report a stall."""
    watched = StallReporting(dataset, STALL_FRACTION * timeout_s) if cfg.workers > 0 and timeout_s > 0 else dataset
    return WorkersIgnoreNotices(make_loader(watched, cfg, pin_memory, timeout_s, worker_init_fn=ignore_in_worker))


class StallReporting(IterableDataset):
    """`dataset` as a DataLoader worker runs it: while it makes an item, a faulthandler watchdog waits
    `after_s`, then prints every thread's stack to stderr. Not while the item waits to be taken: a slow
    training step is not a stalled worker."""

    def __init__(self, dataset: IterableDataset, after_s: float):
        self.dataset, self.after_s = dataset, after_s

    def __iter__(self) -> Iterator[Any]:
        iterator = iter(self.dataset)
        # the process's own stderr: sys.stderr may be a stream without a file descriptor (captured, a notebook)
        stderr = sys.__stderr__ if get_worker_info() is not None else None
        try:
            while True:
                if stderr is not None:
                    faulthandler.dump_traceback_later(self.after_s, file=stderr)
                try:
                    item = next(iterator)
                except StopIteration:
                    return
                finally:
                    if stderr is not None:  # never another watchdog's (pytest's faulthandler_timeout)
                        faulthandler.cancel_dump_traceback_later()
                yield item
        finally:
            if stderr is not None:
                faulthandler.cancel_dump_traceback_later()
