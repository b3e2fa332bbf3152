"""The `launch/submit.py` command line: options, what it prints, `--wait`.

The submitting itself (resources, sweeps, the job, its requeue) lives in `dist_train.slurm.job`; `status`
and `tail` in `dist_train.slurm.status`; reading a failed job's ranks in `dist_train.slurm.outcome`.
"""

from __future__ import annotations

import shlex
import sys

import submitit

from dist_train.cli_help import ArgumentParser, exit_codes
from dist_train.config import ConfigError, SlurmConfig
from dist_train.main import add_run_arguments
from dist_train.slurm import status
from dist_train.slurm.job import (
    MIN_SAFE_TIME_MIN,
    Resources,
    Submission,
    UsageError,
    log_paths,
    plan_submission,
    render_sbatch,
    submit,
    wait_until_done,
)
from dist_train.slurm.outcome import failure_report, rank_failures

# ------------------------------------------------------------------ command line

DESCRIPTION = """Submit training to SLURM (or run it locally) with submitit.

The config is checked as launch/train.py checks it (keys, values, shards that exist, a known backbone,
weights in the cache) for every run of a sweep, before anything is rendered or submitted.
Also: `launch/submit.py status RUN` and `launch/submit.py tail [-f] RUN` (RUN: a run name or directory;
see their --help)."""
EPILOG = exit_codes({0: "submitted (with --wait: every job completed; --dry-run: script printed)",
                     1: "sbatch refused the job, or with --wait a job failed",
                     2: "bad input: config, shards, backbone or options (nothing submitted)"})
RESOURCE_OPTIONS = [  # (flag, Resources field, metavar (None: a string), help)
    ("--nodes", "nodes", "N", "nodes"),
    ("--gpus-per-node", "gpus_per_node", "N", "GPUs per node, one task each"),
    ("--tasks-per-node", "tasks_per_node", "N", "tasks (ranks) per node, for CPU runs"),
    ("--cpus-per-task", "cpus_per_task", "N", "CPUs per task"),
    ("--mem", "mem_gb", "GB", "memory per node"),
    ("--time", "time_min", "MINUTES", "time limit"),
    ("--partition", "partition", None, "SLURM partition"),
    ("--account", "account", None, "SLURM account"),
    ("--qos", "qos", None, "SLURM quality of service"),
    ("--constraint", "constraint", None, "SLURM node constraint"),
]


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="launch/submit.py", description=DESCRIPTION, epilog=EPILOG)
    add_run_arguments(parser, resume=False)  # the job decides: --resume auto, so a requeue continues
    parser.add_argument("--sweep", nargs="+", action="extend", default=[], metavar="KEY=V1,V2",
                        help="a job array: one run per combination, grouped in wandb under the run name "
                             "(default: no sweep, one run)")
    parser.add_argument("--run-name", help="run name, the run directory's name (default: the config's name)")
    parser.add_argument("--job-name", help="SLURM job name (default: the run name)")
    parser.add_argument("--folder", help="submitit's logs and pickles (default: <run_root>/<run name>/submitit)")
    resources = parser.add_argument_group("resources (each defaults to the config's slurm: section)")
    for flag, dest, metavar, text in RESOURCE_OPTIONS:
        resources.add_argument(flag, dest=dest, metavar=metavar, type=int if metavar else str,
                               help=f"{text} (default: slurm.{dest} of the config, {_builtin_default(dest)})")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true",
                      help="check the config, print the sbatch script; submit nothing")
    mode.add_argument("--local", action="store_true", help="run here with submitit's local executor, no SLURM")
    parser.add_argument("--wait", action="store_true",
                        help="wait for the end; on failure print the failing rank's error line and exit 1")
    return parser


def _builtin_default(name: str) -> str:
    value = getattr(SlurmConfig(), name)
    return "none" if value is None else f"built in: {value}"


def cli(argv: list[str]) -> int:
    """`launch/submit.py`: submit (or --dry-run, --local); `status RUN`; `tail RUN`. Returns the exit code."""
    if argv[:1] in (["status"], ["tail"]):
        return status.cli(argv)
    args = build_parser().parse_args(argv)
    names = [dest for _, dest, _, _ in RESOURCE_OPTIONS]
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
              f"  rank 0 logs:   {stdout}\n                 {stderr}\n"
              f"  follow with:   python launch/submit.py tail -f {run.run_dir}")
        if (run.run_dir / "checkpoints").is_dir():
            print("  note: the run directory has checkpoints; the job resumes from the latest (--resume auto)")


def _wait(submission: Submission, jobs: list[submitit.Job]) -> int:
    """Wait for every job; a failed one is reported by its failing rank's error line and log."""
    failed = 0
    for job, run in zip(jobs, submission.runs):
        wait_until_done(job)
        failures = rank_failures(job, ended=True)
        if not failures:
            print(f"job {job.job_id} (run {run.name}) completed")
            continue
        failed += 1
        report = failure_report(failures)
        print(f"error: job {job.job_id} (run {run.name}) failed on {report[0]}", *report[1:], sep="\n",
              file=sys.stderr)
    return 1 if failed else 0
