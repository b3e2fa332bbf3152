"""Preemption notices: a signal only raises a flag; the loop acts on it at the next optimizer step.

Why a flag and not work in the handler: a signal lands between any two bytecodes, maybe inside a
collective or a checkpoint write. The loop instead sums `requested()` over ranks (one all-reduce) once
per optimizer step, so every rank learns of a notice that reached only some of them (submitit calls
`checkpoint()` on the first task only), saves its shard in step with the others, then raises
`Preempted`. The launcher decides what follows: `dist_train.slurm.job.TrainingJob` requeues through
submitit, torchrun simply ends.

SIGUSR2 is the notice SLURM sends before the time limit (`#SBATCH --signal=USR2@90`) and the one
submitit's `job._interrupt()` sends. SIGTERM is a notice too for torchrun and plain runs, but not
under submitit, which deliberately ignores it: SLURM sends it to a cancelled or requeued job, where
saving and requeuing again would be wrong.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import signal
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any, Generic, TypeVar

NOTICE_SIGNAL = signal.SIGUSR2
"""What SLURM and submitit send as a preemption or time-limit notice."""
_NOTICES = {NOTICE_SIGNAL, signal.SIGTERM}
T = TypeVar("T")


class Preempted(Exception):
    """Every rank saved a checkpoint after a preemption notice; the launcher requeues or exits."""


_requested = False
_owner_pid: int | None = None


def install_handlers(sigterm: bool = True) -> dict[signal.Signals, Any]:
    """Make SIGUSR2 (and SIGTERM when `sigterm`) set the notice flag in this process.

    Call it in every rank's main process before DataLoader workers start. Returns the handlers that
    were replaced, so a launcher can still run its own requeue path once the checkpoint is saved.
    """
    global _owner_pid
    if _owner_pid is None:
        atexit.register(_end_workers)
    _owner_pid = os.getpid()
    signals = [NOTICE_SIGNAL, signal.SIGTERM] if sigterm else [NOTICE_SIGNAL]
    return {signum: signal.signal(signum, _on_signal) for signum in signals}


def installed() -> bool:
    """Whether this process already installed the handlers (a launcher did): entries need not again."""
    return _owner_pid == os.getpid()


def requested() -> bool:
    """True once a notice arrived in this process (until `clear()`)."""
    return _requested


def request() -> None:
    """Raise the flag as a notice would (tests, or a launcher that learns of preemption otherwise)."""
    global _requested
    _requested = True


def clear() -> None:
    global _requested
    _requested = False


def _end_workers() -> None:
    """SIGKILL this process's daemonic children (DataLoader workers) on the way out.

    The workers ignore SIGTERM (`ignore_in_worker`), so multiprocessing's own exit hook, which sends
    SIGTERM to daemonic children and then joins them, would wait for ever after a rank failed with
    its workers alive. atexit runs hooks last-registered first: this one runs before that hook."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


def ignore_in_worker(worker_id: int = 0) -> None:
    """A DataLoader worker's `worker_init_fn`: the worker ignores notices, SIGTERM included.

    SLURM signals every process of a job step, workers too; a worker that died of it would fail its
    rank before the rank could checkpoint. The rank ends its workers itself, and they exit with it.
    A notice that came while the worker started (`WorkersIgnoreNotices` held it) is discarded here."""
    signal.signal(NOTICE_SIGNAL, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _NOTICES)


@contextmanager
def notices_held() -> Iterator[None]:
    """Hold notices back in this thread (they stay pending and arrive at the end), and in what it forks."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, _NOTICES)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


class WorkersIgnoreNotices(Generic[T]):
    """A DataLoader (with `ignore_in_worker`) whose workers fork with the notices held back.

    Between its fork and `ignore_in_worker` a worker still has the rank's handler, which lets a SIGTERM
    kill it (as it must for a multiprocessing pool): a notice in that window, when SLURM signals every
    process of the step just as a loader starts its workers, failed the rank instead of checkpointing."""

    def __init__(self, loader: Iterable[T]):
        self.loader = loader

    def __iter__(self) -> Iterator[T]:
        with notices_held():
            return iter(self.loader)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    """Set the flag in the rank's own process. Other forked children (a multiprocessing pool) inherit this
    handler and must not act: they ignore the notice and die on SIGTERM as they would have without us;
    DataLoader workers ignore both (`ignore_in_worker`)."""
    if os.getpid() == _owner_pid:
        request()
    elif signum == signal.SIGTERM:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
