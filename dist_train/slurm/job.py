"""Training as a SLURM job (or a local one) through submitit: resources, sweeps, the job, its requeue.

`python launch/submit.py --nodes 2 --config configs/airogs_v2.yaml` validates the config, renders the
resources from the command line and the config's `slurm:` section, and submits a `TrainingJob`: one
task per GPU (or `--tasks-per-node` CPU tasks) on each node, each task a rank of `dist_train.main`.
The job is `submitit.helpers.Checkpointable`: on a preemption or time-limit notice every rank saves its
checkpoint (see `dist_train.train.preemption`), rank 0 requeues the job through submitit's own path, and the
requeued job resumes with `--resume auto` in the same run directory (same wandb run: its id is in the
checkpoint). `--local` runs the same job with submitit's local executor, on this machine, no SLURM.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import re
import shlex
import signal
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit
from submitit.helpers import Checkpointable

from dist_train import compat
from dist_train.config import Config, SlurmConfig, load_config
from dist_train.errors import UserError
from dist_train.train import preemption, rendezvous

REPO_ROOT = Path(__file__).resolve().parent.parent
SUBMISSIONS_FILE = "submissions.jsonl"
"""One line per submission in the run directory: how `status` and `tail` find the job."""
MIN_SAFE_TIME_MIN = 10
"""Below this, submitit counts every notice as a time-out and spends its few requeues (3 by default)."""


class UsageError(UserError, ValueError):
    """Options that contradict each other or the config; reported as `error: ...`, exit 2."""


# ------------------------------------------------------------------ what to run, where


@dataclass(frozen=True)
class Resources:
    """What one job asks of SLURM; command-line options win over the config's `slurm:` section."""

    nodes: int
    tasks_per_node: int
    gpus_per_node: int
    cpus_per_task: int
    time_min: int
    mem_gb: int | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None


@dataclass(frozen=True)
class RunPlan:
    """One training run: its name, directory and the argv handed to `dist_train.main`."""

    name: str
    run_dir: Path
    argv: list[str]


@dataclass(frozen=True)
class Submission:
    """One job, or one job array for a sweep: the runs, shared resources and submitit's log folder."""

    runs: list[RunPlan]
    resources: Resources
    folder: Path
    job_name: str


def resolve_resources(options: dict[str, Any], defaults: SlurmConfig) -> Resources:
    """Merge options (None = not given) over the config; one task per GPU when GPUs are asked for."""
    picked: dict[str, Any] = {field.name: options.get(field.name) if options.get(field.name) is not None
              else getattr(defaults, field.name) for field in dataclasses.fields(Resources)}
    gpus = picked["gpus_per_node"]
    if gpus and options.get("tasks_per_node") not in (None, gpus):
        raise UsageError(f"--tasks-per-node {options['tasks_per_node']} with --gpus-per-node {gpus}: "
                         "GPU runs start one task per GPU; drop --tasks-per-node")
    if gpus:
        picked["tasks_per_node"] = gpus
    for name in ("nodes", "tasks_per_node", "cpus_per_task", "time_min"):
        if picked[name] < 1:
            raise UsageError(f"{name.replace('_', '-')} must be at least 1, got {picked[name]}")
    return Resources(**picked)


def expand_sweep(specs: list[str]) -> list[list[tuple[str, str]]]:
    """`["optim.lr=1e-4,2e-4", "loss.gamma=1.5,2"]` -> every combination, as (key, value) pairs."""
    axes = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        choices = [value.strip() for value in values.split(",") if value.strip()]
        if not sep or not key.strip() or not choices:
            raise UsageError(f"--sweep {spec!r}: expected key=value1,value2,...")
        axes.append([(key.strip(), value) for value in choices])
    return [list(combination) for combination in itertools.product(*axes)] if axes else [[]]


def sweep_run_name(base: str, combination: list[tuple[str, str]]) -> str:
    """`base-lr1e-4-gamma1.5`: the last key segment and the value, safe for a directory name."""
    parts = [base] + [f"{key.rsplit('.', 1)[-1]}{value}" for key, value in combination]
    return re.sub(r"[^A-Za-z0-9._+=-]", "_", "-".join(parts))


def plan_submission(config: str | None, overrides: list[str], sweep: list[str], run_name: str | None,
                    job_name: str | None, folder: str | None, resource_options: dict[str, Any]) -> Submission:
    """Validate the config and run train.py's preflight once per run (ConfigError before anything is
    submitted or rendered: a job that cannot start should not wait in the queue to say so) and lay out the job."""
    config_path = str(Path(config).absolute()) if config else None
    base_overrides = list(overrides) + ([f"name={run_name}"] if run_name else [])
    base = load_config(config_path, base_overrides)
    run_root = Path(base.run_root).absolute()
    combinations = expand_sweep(sweep)
    runs = [_plan_run(config_path, base_overrides, base, run_root, combination, is_sweep=bool(sweep))
            for combination in combinations]
    return Submission(runs=runs, resources=resolve_resources(resource_options, base.slurm),
                      folder=Path(folder).absolute() if folder else run_root / base.name / "submitit",
                      job_name=job_name or base.name)


def _plan_run(config_path: str | None, overrides: list[str], base: Config, run_root: Path,
              combination: list[tuple[str, str]], is_sweep: bool) -> RunPlan:
    name = sweep_run_name(base.name, combination) if is_sweep else base.name
    settings = overrides + [f"{key}={value}" for key, value in combination]
    settings += [f"name={name}", f"run_root={run_root}"]  # absolute: the job's working directory may differ
    if is_sweep:
        settings.append(f"tracking.wandb.group={base.name}")
    cfg = load_config(config_path, settings)
    from dist_train.main import preflight  # where train.py's checks live; main is heavy, the job imports it late too

    preflight(cfg, config_path or "<defaults>", settings)
    argv = (["--config", config_path] if config_path else []) + ["--set", *settings]
    return RunPlan(name=name, run_dir=cfg.run_dir, argv=argv)


# ------------------------------------------------------------------ the job


class TrainingJob(Checkpointable):
    """One rank of a training run, as submitit runs it in every task; requeues itself when preempted."""

    def __init__(self, argv: list[str]):
        self.argv = list(argv)

    def __call__(self) -> dict[str, Any]:
        dist_env = export_rendezvous()
        print(f"dist_train: rank {dist_env.rank}/{dist_env.world_size} on {socket.gethostname()}, "
              f"rendezvous {dist_env.master_addr}:{dist_env.master_port}", flush=True)
        # submitit's own handler checkpoints and requeues at once; keep it for after our save.
        submitit_requeue = signal.getsignal(preemption.NOTICE_SIGNAL)
        preemption.install_handlers(sigterm=False)  # submitit ignores SIGTERM (sent on cancel/requeue)
        from dist_train.main import main

        try:
            exit_code = main(self.argv + ["--resume", "auto"])
        except preemption.Preempted:
            self._requeue(submitit_requeue, dist_env.rank)
            raise
        if exit_code != 0:
            raise RuntimeError(f"dist_train.main exited with code {exit_code} on rank {dist_env.rank} "
                               f"({socket.gethostname()}):\n{_own_stderr_tail()}")
        return {"rank": dist_env.rank, "hostname": socket.gethostname(), "exit_code": exit_code}

    @staticmethod
    def _requeue(submitit_requeue: Any, rank: int) -> None:
        """Every rank has saved its checkpoint. Rank 0 runs submitit's checkpoint-and-requeue path
        (it calls `checkpoint()`, dumps the job, `scontrol requeue`s it and exits); the others leave
        quietly without a result file, since the job is not over."""
        if rank != 0:
            sys.exit(0)
        if callable(submitit_requeue):
            submitit_requeue(preemption.NOTICE_SIGNAL, None)


def export_rendezvous() -> submitit.helpers.TorchDistributedEnvironment:
    """submitit's rank variables and rendezvous host, with the port by our SLURM rule.

    submitit draws its port from 20000-60000 (seeded by the job id), and two in three of those lie in
    Linux's ephemeral range, where any outgoing connection on the node may already hold it: rank 0 then
    fails with EADDRINUSE (seen on the test cluster, job 114 -> port 46368). Our rule keeps the port
    below that range and apart for neighbouring jobs and steps. A MASTER_PORT the job was given wins
    (submitit reads it); `overwrite` because submitit otherwise refuses any variable already set, ours too.
    """
    port = rendezvous.slurm_master_port(os.environ)
    if port is not None:
        os.environ.setdefault("MASTER_PORT", port)
    return submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)


def _own_stderr_tail(lines: int = 30) -> str:
    """The end of this task's stderr log, where `dist_train.main` printed why it stopped."""
    sys.stderr.flush()
    try:
        path = submitit.JobEnvironment().paths.stderr
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except (OSError, RuntimeError, KeyError):
        return "(no stderr log found)"


# ------------------------------------------------------------------ executors


class _RenderOnlyExecutor(submitit.SlurmExecutor):
    """Renders sbatch scripts where SLURM is absent: only the constructor's `srun` check differs."""

    @classmethod
    def affinity(cls) -> int:
        return 2


def job_setup() -> list[str]:
    """Shell lines run before the tasks: the repo importable (the job unpickles `TrainingJob`), and
    one math thread per allotted CPU, so ranks sharing a node do not oversubscribe it."""
    return [f"export PYTHONPATH={shlex.quote(str(REPO_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}",
            "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"]


def slurm_parameters(resources: Resources, job_name: str) -> dict[str, Any]:
    """submitit SlurmExecutor parameters; a rank that crashes ends the whole step (--kill-on-bad-exit)
    rather than leaving the others waiting in a collective until the process-group timeout."""
    params: dict[str, Any] = {"job_name": job_name, "time": resources.time_min, "nodes": resources.nodes,
                              "ntasks_per_node": resources.tasks_per_node, "cpus_per_task": resources.cpus_per_task,
                              "setup": job_setup(), "srun_args": ["--kill-on-bad-exit=1"]}
    if resources.gpus_per_node:
        params["gpus_per_node"] = resources.gpus_per_node
    if resources.mem_gb:
        params["mem"] = f"{resources.mem_gb}GB"
    for name in ("partition", "account", "qos", "constraint"):
        if getattr(resources, name):
            params[name] = getattr(resources, name)
    return params


def make_executor(submission: Submission, local: bool = False, render_only: bool = False) -> submitit.Executor:
    resources = submission.resources
    executor: submitit.Executor
    if local:
        executor = submitit.LocalExecutor(submission.folder)
        executor.update_parameters(timeout_min=resources.time_min, gpus_per_node=resources.gpus_per_node,
                                   tasks_per_node=resources.nodes * resources.tasks_per_node, setup=job_setup())
        return executor
    executor = (_RenderOnlyExecutor if render_only else submitit.SlurmExecutor)(submission.folder)
    executor.update_parameters(**slurm_parameters(resources, submission.job_name))
    return executor


def render_sbatch(submission: Submission) -> str:
    """The sbatch script submitit would submit for this submission (an array for a sweep)."""
    executor = make_executor(submission, render_only=True)
    if len(submission.runs) > 1:
        executor.parameters["map_count"] = len(submission.runs)
    return compat.submission_text(executor)


def submit(submission: Submission, local: bool = False) -> list[submitit.Job]:
    """Submit every run (a job array for a sweep) and record each job in its run directory."""
    executor = make_executor(submission, local=local)
    jobs_to_run = [TrainingJob(run.argv) for run in submission.runs]
    with _clean_env():
        jobs = executor.submit_array(jobs_to_run) if len(jobs_to_run) > 1 else [executor.submit(jobs_to_run[0])]
    for job, run in zip(jobs, submission.runs):
        record_submission(run, job, "local" if local else "slurm")
    return jobs


@contextlib.contextmanager
def _clean_env() -> Iterator[None]:
    """No SLURM_*/RANK/MASTER_* of a surrounding job leak into the new one (submitit's clean_env), but
    SLURM_CONF, which says which cluster sbatch talks to, stays."""
    slurm_conf = os.environ.get("SLURM_CONF")
    with submitit.helpers.clean_env():
        if slurm_conf is not None:
            os.environ["SLURM_CONF"] = slurm_conf
        yield


def record_submission(run: RunPlan, job: submitit.Job, cluster: str) -> None:
    run.run_dir.mkdir(parents=True, exist_ok=True)
    record = {"job_id": job.job_id, "cluster": cluster, "folder": str(job.paths.folder),
              "num_tasks": job.num_tasks, "submitted": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with open(run.run_dir / SUBMISSIONS_FILE, "a") as handle:
        handle.write(json.dumps(record) + "\n")


# ------------------------------------------------------------------ results


def wait_until_done(job: submitit.Job, poll_s: float = 3.0) -> None:
    """Block until every task is over. submitit alone asks sacct ever more rarely (up to every 10
    minutes); someone waiting on one job wants to hear promptly of a job that died without a result."""
    while not all(job.task(task).done(force_check=True) for task in range(job.num_tasks)):
        time.sleep(poll_s)


def log_paths(job: submitit.Job) -> tuple[Path, Path]:
    """Rank 0's stdout and stderr files (each task writes its own pair in the same folder)."""
    paths = job.task(0).paths
    return paths.stdout, paths.stderr
