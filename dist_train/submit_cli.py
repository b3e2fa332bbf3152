"""The `launch/submit.py` command line: options, what it prints, `--wait`, and `status` / `tail`.

The submitting itself (resources, sweeps, the job, its requeue) lives in `dist_train.slurm`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import submitit

from dist_train.config import ConfigError
from dist_train.slurm import (
    MIN_SAFE_TIME_MIN,
    SUBMISSIONS_FILE,
    Resources,
    Submission,
    UsageError,
    job_error,
    log_paths,
    plan_submission,
    render_sbatch,
    submit,
    wait_until_done,
)

# ------------------------------------------------------------------ command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launch/submit.py",
                                     description="Submit training to SLURM (or run it locally) with submitit.",
                                     epilog="Also: `status RUN` and `tail RUN` (RUN: a run name or directory).")
    parser.add_argument("--config", help="YAML preset (configs/*.yaml)")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help="dotted overrides")
    parser.add_argument("--sweep", nargs="+", action="extend", default=[], metavar="KEY=V1,V2",
                        help="a job array: one run per combination, grouped in wandb under the run name")
    parser.add_argument("--run-name", help="run name (default: the config's name); the run directory's name")
    parser.add_argument("--job-name", help="SLURM job name (default: the run name)")
    parser.add_argument("--folder", help="submitit's logs and pickles (default: <run_root>/<run name>/submitit)")
    resources = parser.add_argument_group("resources (default: the config's slurm: section)")
    resources.add_argument("--nodes", type=int)
    resources.add_argument("--gpus-per-node", type=int, help="one task per GPU")
    resources.add_argument("--tasks-per-node", type=int, help="tasks (ranks) per node, for CPU runs")
    resources.add_argument("--cpus-per-task", type=int)
    resources.add_argument("--mem", type=int, dest="mem_gb", metavar="GB", help="memory per node")
    resources.add_argument("--time", type=int, dest="time_min", metavar="MINUTES", help="time limit")
    for name in ("partition", "account", "qos", "constraint"):
        resources.add_argument(f"--{name}")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the sbatch script; submit nothing")
    mode.add_argument("--local", action="store_true", help="run here with submitit's local executor, no SLURM")
    parser.add_argument("--wait", action="store_true", help="wait for the end; on failure print the error, exit 1")
    return parser


def cli(argv: list[str]) -> int:
    """`launch/submit.py`: submit (or --dry-run, --local); `status RUN`; `tail RUN`. Returns the exit code."""
    if argv[:1] in (["status"], ["tail"]):
        return _inspect(argv)
    args = build_parser().parse_args(argv)
    names = ("nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "mem_gb", "time_min", "partition",
             "account", "qos", "constraint")
    try:
        submission = plan_submission(args.config, args.set, args.sweep, args.run_name, args.job_name, args.folder,
                                     {name: getattr(args, name) for name in names})
    except (ConfigError, UsageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    _warn_short_time(submission.resources)
    if args.dry_run:
        _print_dry_run(submission)
        return 0
    try:
        jobs = submit(submission, local=args.local)
    except submitit.core.utils.FailedJobError as error:  # sbatch refused the job
        print(f"error: submission failed: {error}", file=sys.stderr)
        return 1
    _print_submitted(submission, jobs, args.local)
    return _wait(submission, jobs) if args.wait else 0


def _warn_short_time(resources: Resources) -> None:
    if resources.time_min < MIN_SAFE_TIME_MIN:
        print(f"warning: --time {resources.time_min} < {MIN_SAFE_TIME_MIN} minutes: submitit treats every "
              "preemption notice as a time-out and requeues at most 3 times", file=sys.stderr)


def _print_dry_run(submission: Submission) -> None:
    print(render_sbatch(submission))
    for index, run in enumerate(submission.runs):
        task = f"array task {index}: " if len(submission.runs) > 1 else ""
        print(f"# {task}run {run.name} in {run.run_dir}: python -m dist_train.main {shlex.join(run.argv)}")
    print("# dry run: nothing submitted")


def _print_submitted(submission: Submission, jobs: list[submitit.Job], local: bool) -> None:
    resources = submission.resources
    where = (f"locally, {resources.nodes * resources.tasks_per_node} tasks" if local
             else f"{resources.nodes} node(s) x {resources.tasks_per_node} task(s)")
    for job, run in zip(jobs, submission.runs):
        stdout, stderr = log_paths(job)
        print(f"submitted job {job.job_id} ({where}): run {run.name}\n  run directory: {run.run_dir}\n"
              f"  rank 0 logs:   {stdout}\n                 {stderr}")
        if (run.run_dir / "checkpoints").is_dir():
            print("  note: the run directory has checkpoints; the job resumes from the latest (--resume auto)")
    print(f"follow with: python launch/submit.py tail {submission.runs[0].run_dir}")


def _wait(submission: Submission, jobs: list[submitit.Job]) -> int:
    failures = 0
    for job, run in zip(jobs, submission.runs):
        wait_until_done(job)
        error = job_error(job)
        if error is None:
            print(f"job {job.job_id} (run {run.name}) completed")
        else:
            failures += 1
            print(f"error: job {job.job_id} (run {run.name}) failed:\n{error}", file=sys.stderr)
    return 1 if failures else 0


def _inspect(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"launch/submit.py {argv[0]}")
    parser.add_argument("run", help="run name or run directory")
    parser.add_argument("--run-root", default="runs", help="where run names are looked up")
    parser.add_argument("--lines", type=int, default=40)
    args = parser.parse_args(argv[1:])
    run_dir = find_run_dir(args.run, args.run_root)
    try:
        record = last_submission(run_dir)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    stdout, stderr = log_paths(job_from_record(record))
    if argv[0] == "status":
        print(f"job {record['job_id']} ({record['cluster']}, submitted {record['submitted']}): "
              f"{describe_state(record)}\n  run directory: {run_dir}\n  rank 0 logs: {stdout}")
        return 0
    print(f"==> {stdout} <==\n{tail_file(stdout, args.lines)}\n==> {stderr} <==\n{tail_file(stderr, args.lines)}")
    return 0


# ------------------------------------------------------------------ status and tail


def find_run_dir(run: str, run_root: str = "runs") -> Path:
    """A run directory given as a path, or as a name under run_root."""
    candidate = Path(run)
    return candidate if (candidate / SUBMISSIONS_FILE).exists() else Path(run_root) / run


def last_submission(run_dir: Path) -> dict[str, Any]:
    path = run_dir / SUBMISSIONS_FILE
    if not path.exists():
        raise UsageError(f"{run_dir} has no {SUBMISSIONS_FILE}: was it submitted with launch/submit.py?")
    return json.loads(path.read_text().strip().splitlines()[-1])


def job_from_record(record: dict[str, Any]) -> submitit.Job:
    tasks = list(range(int(record.get("num_tasks", 1))))
    job_class = submitit.SlurmJob if record["cluster"] == "slurm" else submitit.LocalJob
    return job_class(folder=record["folder"], job_id=record["job_id"], tasks=tasks)


def describe_state(record: dict[str, Any]) -> str:
    """SLURM's view of the job (sacct; it lags the end by a second or two) and what rank 0 left."""
    job = job_from_record(record)
    result = job.task(0).paths.result_pickle
    left = "rank 0 wrote its result" if result.exists() else "no result from rank 0 yet"
    if record["cluster"] != "slurm":
        return f"local job, {left}"
    return f"{job.watcher.get_state(record['job_id'], mode='force')}, {left}"


def tail_file(path: Path, lines: int) -> str:
    if not path.exists():
        return f"({path} does not exist yet)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
