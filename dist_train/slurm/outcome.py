"""What became of a submitted job's ranks: which one failed, and the one line that says why.

`submit.py --wait` and `submit.py status` report a failed job by its failing rank's first error line, not
by a 20-line submitit traceback. A rank that fails on its own (dist_train.main printed `error: ...`, or
raised) is the failing rank; a rank that lost its peer (a gloo/NCCL "connection reset") only followed it,
and one that left no result at all was killed (out of memory, a signal, SLURM ending the step).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import submitit

_PREFIX = r"^(?:\[rank\d+\]:\s*)?"  # torch.distributed prefixes each line a rank prints
MAIN_ERROR = re.compile(_PREFIX + r"((?:config )?error: .+)$", re.MULTILINE)
"""The line dist_train.main prints when it stops on purpose."""
RAISED = re.compile(_PREFIX + r"((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception|Interrupt|Exit)\b.*)$", re.MULTILINE)
"""The last line of a Python traceback: `SomeError: message`."""
MAIN_EXIT = re.compile(r"dist_train\.main exited with code (\d+)")
"""How `slurm.TrainingJob` reports a non-zero exit of dist_train.main."""
PEER_LOST = re.compile(r"Connection (?:reset|closed) by peer|remote worker|DistBackendError|NCCL (?:error|communicator)"
                       r"|ProcessGroup\w* (?:timed out|abort)", re.IGNORECASE)
NO_RESULT = "ended without a result (killed: out of memory, a signal, or the job ended when another rank failed)"
SRUN_TASK = re.compile(r"^srun: error: (\S+): tasks? ([\d,\-]+): (.+)$", re.MULTILINE)
"""srun's word on each task it saw end, in the order it saw them, in the batch log (rank 0's stderr)."""


@dataclass(frozen=True)
class RankFailure:
    """One failed rank: its error line, the log that has the rest, and why it ranks where it does."""

    rank: int
    line: str
    log: Path
    exit_code: int | None = None
    kind: int = 0
    """0 stopped with its own error, 1 raised, 2 left no result, 3 lost a peer: the failing rank sorts first."""
    when: float = 0.0

    def describe(self) -> str:
        code = f" (exit code {self.exit_code})" if self.exit_code is not None else ""
        return f"rank {self.rank}{code}: {self.line}"


def error_line(text: str) -> str | None:
    """The first line dist_train.main printed as an error, else the exception a traceback ends with."""
    own = MAIN_ERROR.search(text)
    if own:
        return own.group(1).strip().removeprefix("error: ")
    raised = RAISED.findall(text)
    return raised[-1].strip() if raised else None


def rank_failures(job: submitit.Job, ended: bool) -> list[RankFailure]:
    """Every failed rank of `job`, the failing one first. Ranks without a result count only once the job
    has `ended` (until then they are still running)."""
    srun = srun_reports(_read(job.task(0).paths.stderr))
    failures = [failure for rank in range(job.num_tasks) if (failure := _rank_failure(job, rank, ended, srun))]
    return sorted(failures, key=lambda failure: (failure.kind, failure.when, failure.rank))


def srun_reports(batch_log: str) -> dict[int, tuple[int, str]]:
    """rank -> (order in which srun reported it, `node2: task 1: Killed`): the first task srun saw die
    is the one that took the step down (`--kill-on-bad-exit`)."""
    reports: dict[int, tuple[int, str]] = {}
    for order, (node, tasks, what) in enumerate(SRUN_TASK.findall(batch_log)):
        for rank in _task_ids(tasks):
            reports.setdefault(rank, (order, f"{node}: task {rank}: {what}"))
    return reports


def _task_ids(spec: str) -> list[int]:
    """srun's `1`, `0-3` or `1,3-4`."""
    ids: list[int] = []
    for part in spec.split(","):
        first, _, last = part.partition("-")
        ids.extend(range(int(first), int(last or first) + 1))
    return ids


def _rank_failure(job: submitit.Job, rank: int, ended: bool, srun: dict[int, tuple[int, str]]) -> RankFailure | None:
    paths = job.task(rank).paths
    if paths.result_pickle.exists():
        outcome, payload = submitit.core.utils.pickle_load(paths.result_pickle)
        if outcome == "success":
            return None
        return _from_text(rank, str(payload), paths.stderr, paths.result_pickle.stat().st_mtime)
    if not ended:
        return None
    if rank in srun:
        order, said = srun[rank]
        return RankFailure(rank, f"ended without a result; srun: {said}", paths.stderr, kind=2, when=order)
    logged = error_line(_read(paths.stderr))
    line = f"{NO_RESULT}; its log ends with: {logged}" if logged else NO_RESULT
    return RankFailure(rank, line, paths.stderr, kind=2, when=float("inf"))


def _from_text(rank: int, trace: str, log: Path, when: float) -> RankFailure:
    line = error_line(trace) or error_line(_read(log)) or "failed (no error line found)"
    exit_code = MAIN_EXIT.search(trace)
    kind = 0 if MAIN_ERROR.search(trace) else 3 if PEER_LOST.search(line) else 1
    return RankFailure(rank, line, log, int(exit_code.group(1)) if exit_code else None, kind, when)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def failure_report(failures: list[RankFailure], others_shown: int = 3) -> list[str]:
    """`rank N (exit code C): line`, the failing rank's log, then one line per other failed rank (a few,
    then how many more): what --wait and status print instead of submitit's traceback."""
    first, others = failures[0], failures[1:]
    lines = [first.describe(), f"  rank {first.rank} log: {first.log}"]
    lines += [f"  also failed: {other.describe()}" for other in others[:others_shown]]
    if len(others) > others_shown:
        lines.append(f"  ... and {len(others) - others_shown} more rank(s)")
    return lines
