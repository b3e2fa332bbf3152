"""`launch/submit.py status RUN` and `launch/submit.py tail [-f] RUN`: a submitted job, found by its run.

Each submission left a line in `<run dir>/submissions.jsonl` (job id, cluster, submitit folder); the last
one is the job these commands describe. `status` says whether it runs, completed or failed (with the
failing rank's error line); `tail` prints the end of a rank's logs and, with `-f`, follows them to the end.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import submitit

from dist_train.cli_help import ArgumentParser, exit_codes
from dist_train.slurm.job import SUBMISSIONS_FILE, UsageError
from dist_train.slurm.outcome import RankFailure, failure_report, rank_failures

DESCRIPTIONS = {
    "status": "Whether a submitted run's job is pending, running, completed or failed;\n"
              "a failed job is named by its failing rank's first error line and log.",
    "tail": "The end of a submitted run's logs (rank 0's by default);\nwith -f, what they gain until the job ends.",
}
STATUS_CODES = {0: "the job completed or is still running", 1: "the job failed", 2: "bad input (no such run)"}
TAIL_CODES = {0: "logs printed (with -f: the job ended, or Ctrl-C)", 2: "bad input (no such run, no such rank)"}


def build_parser(command: str) -> ArgumentParser:
    codes = STATUS_CODES if command == "status" else TAIL_CODES
    parser = ArgumentParser(prog=f"launch/submit.py {command}", epilog=exit_codes(codes),
                            description=DESCRIPTIONS[command])
    parser.add_argument("run", help="run name (looked up under --run-root) or run directory")
    parser.add_argument("--run-root", default="runs", help="where run names are looked up")
    if command == "tail":
        parser.add_argument("--lines", "-n", type=int, default=40, help="lines of each log to print first")
        parser.add_argument("--rank", type=int, default=0, help="whose logs (each rank writes its own pair)")
        parser.add_argument("--follow", "-f", action="store_true",
                            help="keep printing what the logs gain until the job ends (Ctrl-C stops)")
    return parser


def cli(argv: list[str]) -> int:
    """`status RUN` or `tail RUN` (argv[0] names which). Returns the exit code."""
    args = build_parser(argv[0]).parse_args(argv[1:])
    try:
        run_dir = find_run_dir(args.run, args.run_root)
        record = last_submission(run_dir)
        job = job_from_record(record)
        if argv[0] == "tail" and not 0 <= args.rank < job.num_tasks:
            raise UsageError(f"--rank {args.rank}: the job has ranks 0 to {job.num_tasks - 1}")
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if argv[0] == "status":
        return status(record, job, run_dir)
    return tail(job, record, args.rank, args.lines, args.follow)


# ------------------------------------------------------------------ finding the job


def find_run_dir(run: str, run_root: str = "runs") -> Path:
    """A run directory given as a path, or as a name under run_root."""
    candidate = Path(run)
    return candidate if (candidate / SUBMISSIONS_FILE).exists() else Path(run_root) / run


def last_submission(run_dir: Path) -> dict[str, Any]:
    path = run_dir / SUBMISSIONS_FILE
    if not path.exists():
        raise UsageError(f"{run_dir}: no {SUBMISSIONS_FILE}, so no job submitted with launch/submit.py; give a "
                         "run name (with --run-root if not under runs/) or a run directory")
    return json.loads(path.read_text().strip().splitlines()[-1])


def job_from_record(record: dict[str, Any]) -> submitit.Job:
    tasks = list(range(int(record.get("num_tasks", 1))))
    job_class = submitit.SlurmJob if record["cluster"] == "slurm" else submitit.LocalJob
    return job_class(folder=record["folder"], job_id=record["job_id"], tasks=tasks)


def job_ended(job: submitit.Job, record: dict[str, Any]) -> bool:
    """SLURM's view (sacct), or for a local job whether its controller process still lives: the local
    job's id is that process's pid, and a job object rebuilt here has no process handle to ask."""
    if record["cluster"] == "slurm":
        return all(job.task(task).done(force_check=True) for task in range(job.num_tasks))
    try:
        cmdline = Path(f"/proc/{int(record['job_id'])}/cmdline").read_bytes()
    except (OSError, ValueError):
        return True
    return b"submitit.local._local" not in cmdline


# ------------------------------------------------------------------ status


def status(record: dict[str, Any], job: submitit.Job, run_dir: Path) -> int:
    ended = job_ended(job, record)
    failures = rank_failures(job, ended)
    word = state_word(job, record, ended, failures)
    head = f"job {record['job_id']} ({record['cluster']}, submitted {record['submitted']}): {word}"
    if failures:
        report = failure_report(failures)
        print(f"{head} on {report[0]}" if ended else f"{head}; already failed: {report[0]}", *report[1:], sep="\n")
    else:
        print(head)
    stdout, stderr = job.task(0).paths.stdout, job.task(0).paths.stderr
    print(f"  run directory: {run_dir}\n  rank 0 logs:   {stdout}\n                 {stderr}")
    return 1 if failures and ended else 0


def state_word(job: submitit.Job, record: dict[str, Any], ended: bool, failures: list[RankFailure]) -> str:
    """RUNNING / COMPLETED / FAILED from the ranks' results; SLURM's own word where it says more
    (PENDING, TIMEOUT, CANCELLED, ...)."""
    ours = "FAILED" if failures else "COMPLETED" if ended else "RUNNING"
    if record["cluster"] != "slurm":
        return ours
    slurm = job.watcher.get_state(record["job_id"], mode="force")
    if not ended:
        return slurm
    return ours if slurm in (ours, "UNKNOWN") else f"{ours} (SLURM: {slurm})"


# ------------------------------------------------------------------ tail


def tail(job: submitit.Job, record: dict[str, Any], rank: int, lines: int, follow: bool) -> int:
    """The last `lines` of the rank's stdout and stderr; with `follow`, what they gain until the job ends."""
    paths = job.task(rank).paths
    logs = [paths.stdout, paths.stderr]
    for path in logs:
        print(f"==> {path} <==\n{last_lines(path, lines)}")
    if not follow:
        return 0
    try:
        follow_logs(logs, lambda: job_ended(job, record))
    except KeyboardInterrupt:
        print("\n(stopped following; the job goes on)", file=sys.stderr)
        return 0
    print(f"(job {record['job_id']} ended; `launch/submit.py status` says how)", file=sys.stderr)
    return 0


def last_lines(path: Path, lines: int) -> str:
    if not path.exists():
        return f"({path} does not exist yet)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def follow_logs(paths: list[Path], ended: Callable[[], bool], poll_s: float = 2.0) -> None:
    """Print what each file gains, under a `==> file <==` header when the file changes (as `tail -f`
    does with several files), until `ended()` (asked of sacct once a poll); one last read after the end
    catches the final lines."""
    offsets = {path: path.stat().st_size if path.exists() else 0 for path in paths}
    shown = paths[-1]
    while True:
        over = ended()
        for path in paths:
            new = _read_from(path, offsets[path])
            if new:
                offsets[path] += len(new)
                if path != shown:
                    print(f"\n==> {path} <==")
                    shown = path
                sys.stdout.write(new.decode(errors="replace"))
                sys.stdout.flush()
        if over:
            return
        time.sleep(poll_s)


def _read_from(path: Path, offset: int) -> bytes:
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            return handle.read()
    except OSError:
        return b""
