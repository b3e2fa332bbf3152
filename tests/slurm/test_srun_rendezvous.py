"""Plain `srun python -m dist_train.main` on two nodes, two jobs at once, against the real test cluster.

No launcher exports MASTER_ADDR/MASTER_PORT here: each rank derives them from SLURM's node list and job
id (dist_train/train/rendezvous.py). The test cluster's nodes share one network namespace, so two jobs that
meet on one fixed port (127.0.0.1:29500, as before the fix) collide, and only the job's own port keeps
them apart. Start the cluster first: `tests/slurm/local_cluster.sh start && eval "$(tests/slurm/local_cluster.sh
env)"`.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif("SLURM_CONF" not in os.environ,
                       reason="SLURM_CONF is unset: start the test cluster with tests/slurm/local_cluster.sh "
                              "start and eval \"$(tests/slurm/local_cluster.sh env)\""),
]

JOB_TIMEOUT_S = 300
NOT_INHERITED = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
"""Nothing of this process's own launch may reach the tasks: they must find each other from SLURM alone."""


def srun_training(shards: Path, run_root: Path, name: str) -> subprocess.Popen:
    """One 2-node job step of the tiny config, one task per node, started by srun and nothing else."""
    env = {key: value for key, value in os.environ.items()
           if key not in NOT_INHERITED and (not key.startswith("SLURM_") or key == "SLURM_CONF")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(REPO))
    command = ["srun", "--nodes", "2", "--ntasks-per-node", "1", "--cpus-per-task", "1", "--time", "10",
               "--kill-on-bad-exit=1", "--job-name", name, sys.executable, "-m", "dist_train.main",
               "--config", str(REPO / "configs" / "test_tiny.yaml"), "--set",
               f"data.train_shards={shards}/train-{{000000..000001}}.tar", f"data.val_shards={shards}/val-000000.tar",
               f"run_root={run_root}", f"name={name}", "engine.timeout_s=30"]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def job_span(name: str) -> tuple[datetime.datetime, datetime.datetime]:
    """(start, end) of the job named `name`, from SLURM's accounting (which lags the job by a moment)."""
    deadline = time.monotonic() + 30
    while True:
        rows = subprocess.run(["sacct", "-n", "-X", "-P", "--name", name, "-o", "Start,End"], capture_output=True,
                              text=True, check=True).stdout.split()
        if rows and "Unknown" not in rows[-1]:
            start, end = rows[-1].split("|")
            return datetime.datetime.fromisoformat(start), datetime.datetime.fromisoformat(end)
        if time.monotonic() > deadline:
            raise TimeoutError(f"sacct has no finished job named {name}: {rows}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def shards(make_shards) -> Path:
    return make_shards(train=[48, 48], val=[24]).root


def test_two_plain_srun_jobs_at_once_both_train(shards, tmp_path):
    names = [f"srun-rdv-{os.getpid()}-{index}" for index in range(2)]
    jobs = [srun_training(shards, tmp_path, name) for name in names]
    try:
        outcomes = [job.communicate(timeout=JOB_TIMEOUT_S) for job in jobs]
    finally:
        for job, name in zip(jobs, names):
            if job.poll() is None:
                job.kill()
                subprocess.run(["scancel", "--name", name], capture_output=True)
    for job, name, (_, stderr) in zip(jobs, names, outcomes):
        assert job.returncode == 0, f"{name} exited {job.returncode}:\n{stderr[-4000:]}"
        assert "rank 0/2 on host node1" in stderr, stderr[-4000:]  # rank 0 on the first node, rank 1 elsewhere
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["world_size"] == 2
    (start_a, end_a), (start_b, end_b) = (job_span(name) for name in names)
    assert max(start_a, start_b) < min(end_a, end_b), "the two jobs did not run at the same time"


def test_a_batch_script_that_runs_the_entry_itself_with_two_tasks_is_refused_at_once(shards, tmp_path):
    """sbatch --ntasks=2 whose script calls `python -m dist_train.main` without srun: one process that used to
    wait, as rank 0 of 2, for a rank 1 nobody starts (until the process-group timeout). Now: exit 2, one line."""
    env = {key: value for key, value in os.environ.items()
           if key not in NOT_INHERITED and (not key.startswith("SLURM_") or key == "SLURM_CONF")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true", PYTHONPATH=str(REPO))
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\n" + " ".join([
        sys.executable, "-m", "dist_train.main", "--config", str(REPO / "configs" / "test_tiny.yaml"), "--set",
        f"data.train_shards={shards}/train-{{000000..000001}}.tar", f"data.val_shards={shards}/val-000000.tar",
        f"run_root={tmp_path / 'runs'}", "engine.timeout_s=120"]) + "\n")
    out = tmp_path / "job.out"
    started = time.monotonic()
    job = subprocess.run(["sbatch", "--wait", "--ntasks", "2", "--cpus-per-task", "1", "--time", "5",
                          "--job-name", f"batch-step-{os.getpid()}", f"--output={out}", str(script)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert job.returncode != 0 and time.monotonic() - started < 100, (job.stdout, out.read_text())
    lines = [line for line in out.read_text().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: SLURM allotted 2 tasks") and "srun" in lines[0], lines
    assert not (tmp_path / "runs").exists()
