"""One error hierarchy: every error dist_train raises on purpose carries the exit code its command ends with.

A `UserError` is bad input the user can fix (exit 2, one line, before work is done); any other
`DistTrainError` is a run that failed (exit 1). The entry points print `one_line(error)` and return
`error.exit_code`, so no command keeps its own table of which exception means which code.
"""

from __future__ import annotations

import sys


class DistTrainError(Exception):
    exit_code = 1


class UserError(DistTrainError):
    """Bad input: a config, a path, a file or a flag the user can change."""

    exit_code = 2


class DataError(UserError, RuntimeError):
    """A shard that cannot be read, or too many corrupt samples: the run must stop."""


class WeightsError(UserError, ValueError):
    """A weight file or pretrained id that cannot be used: missing, not cached, unsafe or mismatched."""


class RunRefused(UserError, RuntimeError):
    """Rank 0 refused the run directory (locked by another job, or a resume it cannot take)."""


class RunLocked(RunRefused):
    """Another job is already writing this run directory."""


class LaunchError(UserError, RuntimeError):
    """The processes were started in a way that cannot make the ranks asked for (e.g. SLURM's batch step)."""


class CheckpointError(DistTrainError, RuntimeError):
    """A checkpoint that cannot be written or read; the previous one is intact."""


class TrainingStopped(DistTrainError, RuntimeError):
    """A health rule or a non-finite loss ended the run; the message says why and what to change."""


class CoverageError(DistTrainError, RuntimeError):
    """Validation samples were dropped or counted twice."""


def say(line: str) -> None:
    """`line` and its newline on stderr in one write. The ranks of a job share one stderr, and `print` writes the
    text and the newline separately: with an unbuffered stderr (PYTHONUNBUFFERED, as under torchrun in the
    tests) two ranks' error lines came out as one line and an empty one. One write of a short line is atomic."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def first_line(error: BaseException) -> str:
    """An error's first line (a library's own summary before its details), or its type's name."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def one_line(error: BaseException) -> str:
    """The message itself, on one line: a DataLoader worker re-raises with its traceback folded into the text."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    last = lines[-1] if lines else type(error).__name__
    return last.split(f"{type(error).__name__}: ", 1)[-1]
