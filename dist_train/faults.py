"""Fault injection for the reliability tests (tests/faults/), off unless DIST_TRAIN_FAULT is set.

The reliability matrix needs faults at exact places: a non-finite loss at optimizer step N, or a
SIGKILL at a named point of a checkpoint write. Real runs never set the variable; reading it here,
in one module, keeps the hooks out of the code they test. Syntax: `nan_loss@5`, `kill@<point>`,
`kill@<point>#2` (the second time that point is reached), `notice@<point>` (a preemption notice, as
a signal would raise it), `fail@<point>` (an OSError, as a full disk or an unwritable file would
raise), `abort@<point>` (SIGABRT, as a C++ std::terminate in a backend raises it), `hold@<point>` (wait
there, up to `HOLD_S`, for a real preemption signal: a test that signals a job "mid-run" then cannot
miss the run, however late the signal comes), several joined by commas.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

import torch

from dist_train.train import preemption

_SPEC = os.environ.get("DIST_TRAIN_FAULT", "")
_RANK = os.environ.get("DIST_TRAIN_FAULT_RANK")
_reached: Counter[str] = Counter()
HOLD_S = 120.0
"""How long `hold@` waits for a notice before it lets the run go on (and the test see it was not signalled)."""


def _wanted(kind: str) -> list[str]:
    return [item.split("@", 1)[1] for item in _SPEC.split(",") if item.startswith(kind + "@")]


def _this_rank() -> bool:
    return _RANK is None or os.environ.get("RANK", "0") == _RANK


def corrupt_loss(loss: torch.Tensor, step: int) -> torch.Tensor:
    """The loss, or NaN when `nan_loss@<step>` asks for it at this optimizer step."""
    if _SPEC and _this_rank() and str(step) in _wanted("nan_loss"):
        return loss * float("nan")
    return loss


def point(name: str) -> None:
    """At a named point: SIGKILL (`kill@`), SIGABRT (`abort@`), a preemption notice (`notice@`), an OSError
    (`fail@`) or a wait for a preemption signal (`hold@`)."""
    if not _SPEC or not _this_rank():
        return
    _reached[name] += 1
    if _hit("kill", name):
        os.kill(os.getpid(), signal.SIGKILL)
    if _hit("abort", name):
        os.abort()
    if _hit("notice", name):
        preemption.request()
    if _hit("fail", name):
        raise OSError(f"injected failure at {name}")
    if _hit("hold", name):
        deadline = time.monotonic() + HOLD_S
        while not preemption.requested() and time.monotonic() < deadline:
            time.sleep(0.05)


def _hit(kind: str, name: str) -> bool:
    """Whether `kind@<name>[#n]` asks for this, the `_reached[name]`-th, arrival at `name`."""
    for wanted in _wanted(kind):
        target, _, nth = wanted.partition("#")
        if target == name and _reached[name] == int(nth or 1):
            return True
    return False
