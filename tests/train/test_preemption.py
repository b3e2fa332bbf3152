"""The preemption flag: set by a notice in the rank's own process, ignored by forked DataLoader workers."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from dist_train.train import preemption


@pytest.fixture(autouse=True)
def restore_handlers():
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGUSR2, signal.SIGTERM)}
    preemption.clear()
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)
    preemption.clear()


def test_a_notice_only_sets_the_flag():
    preemption.install_handlers()
    assert not preemption.requested()
    os.kill(os.getpid(), signal.SIGUSR2)
    assert preemption.requested()
    preemption.clear()
    os.kill(os.getpid(), signal.SIGTERM)  # a notice too, outside submitit
    assert preemption.requested()


def test_sigterm_is_left_alone_when_asked():
    before = signal.getsignal(signal.SIGTERM)
    replaced = preemption.install_handlers(sigterm=False)
    assert set(replaced) == {signal.SIGUSR2}
    assert signal.getsignal(signal.SIGTERM) is before


def test_install_returns_the_handlers_it_replaced():
    def launcher_handler(signum, frame):
        pass

    signal.signal(signal.SIGUSR2, launcher_handler)
    assert preemption.install_handlers(sigterm=False)[signal.SIGUSR2] is launcher_handler


def child_exit_status(send: signal.Signals) -> int:
    """Fork as a DataLoader worker would, signal the child, report how it ended."""
    pid = os.fork()
    if pid == 0:
        os.kill(os.getpid(), send)
        os._exit(10 + int(preemption.requested()))
    _, status = os.waitpid(pid, 0)
    return status


def test_forked_workers_ignore_the_notice():
    preemption.install_handlers()
    status = child_exit_status(signal.SIGUSR2)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 10  # alive, flag untouched
    assert not preemption.requested()


def test_forked_workers_still_die_on_sigterm():
    """A multiprocessing pool (the shard builder's) ends its workers with SIGTERM: they must die of it."""
    preemption.install_handlers()
    status = child_exit_status(signal.SIGTERM)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
    assert not preemption.requested()


class _SignalledStream(torch.utils.data.IterableDataset):
    """A worker that receives SIGTERM (SLURM signals every process of a step) and then goes on."""

    def __iter__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        yield from range(3)


def test_a_dataloader_worker_outlives_a_sigterm_to_every_process():
    """The Trainer's loader: without `ignore_in_worker` the worker dies and its rank fails before it can checkpoint."""
    from dist_train.config import DataConfig
    from dist_train.train.loader import training_loader

    preemption.install_handlers()
    loader = training_loader(_SignalledStream(), DataConfig(workers=1, prefetch_factor=2), False)
    assert list(loader) == [0, 1, 2]


HELD_WORKER = """
import torch
from dist_train.config import DataConfig
from dist_train.train import preemption
from dist_train.train.loader import training_loader


class Forever(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield from range(1 << 30)


preemption.install_handlers()
held = iter(training_loader(Forever(), DataConfig(workers=1, prefetch_factor=2), False))
next(held)
raise SystemExit(3)  # a rank that fails with its DataLoader iterator (and worker) still alive
"""


def test_a_rank_that_fails_with_a_live_worker_still_exits():
    """Its worker ignores SIGTERM, so multiprocessing's exit hook alone would wait on it for ever."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", HELD_WORKER], capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stderr[-2000:]


NOTICE_AT_FORK = """
import os
import signal

import torch
from dist_train.config import DataConfig
from dist_train.train import preemption
from dist_train.train.loader import training_loader


class Three(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield from range(3)


preemption.install_handlers()
os.register_at_fork(after_in_child=lambda: os.kill(os.getpid(), signal.SIGTERM))
print(list(training_loader(Three(), DataConfig(workers=1, prefetch_factor=2), False)))
"""


def test_a_sigterm_while_a_worker_starts_does_not_kill_it():
    """SLURM's SIGTERM reaching a worker right after its fork, before `ignore_in_worker` ran (CI saw the
    eval loader's worker die so, and the rank fail instead of checkpointing): the notice waits and is dropped."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", NOTICE_AT_FORK], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[0, 1, 2]", result.stderr[-2000:]


STALLED_WORKER = """
import time

import torch
from dist_train.config import DataConfig
from dist_train.train import preemption
from dist_train.train.loader import training_loader


class Stalls(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield 0
        stuck_here()


def stuck_here():
    time.sleep(30)


preemption.install_handlers()  # as every rank does (main.py): its workers are ended at exit
loader = iter(training_loader(Stalls(), DataConfig(workers=1, prefetch_factor=2), False, timeout_s=4))
print(next(loader))
try:
    next(loader)
except RuntimeError as error:
    print("raised:", error)
"""


def test_a_stalled_worker_prints_where_it_is_before_its_rank_times_out():
    """CI twice saw a rank's worker produce nothing for 300 s, and the DataLoader's error says only that: the
    worker now prints its own stack (faulthandler) at 90% of the timeout, so the log names the stuck line."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", STALLED_WORKER], capture_output=True, text=True, timeout=120)
    assert "raised: DataLoader timed out" in result.stdout, result.stdout + result.stderr[-2000:]
    assert "Timeout (0:00:03" in result.stderr and "stuck_here" in result.stderr, result.stderr[-2000:]
