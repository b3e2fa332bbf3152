"""Preemption outside submitit: SIGTERM to every process of a job, as SLURM signals a job step.

A 2-rank torchrun job (launch/train.py) and a plain one-process run each get SIGTERM after their first
checkpoint. Expected: every rank checkpoints at its next optimizer step, the job exits 0 saying in one
line that it was preempted and where it saved, and a rerun with --resume auto continues from exactly
that checkpoint. Before, SIGTERM killed the ranks with no checkpoint, and torchrun exited non-zero.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from run_helpers import REPO, run_training, train_command

CONFIG = str(REPO / "configs" / "test_tiny.yaml")
STILL_RUNNING = ("model.backbone=test_efficientnet", "train.epochs=50", "train.steps_per_epoch=4",
                 "checkpoint.every_steps=2")
"""200 optimizer steps with a checkpoint every 2: far from done when the first checkpoint appears."""
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(make_shards) -> Path:
    return make_shards(train=[24, 24], val=[8]).root


def overrides(shards: Path, run_root: Path, *extra: str) -> list[str]:
    return [f"data.train_shards={shards}/train-*.tar", f"data.val_shards={shards}/val-*.tar",
            f"run_root={run_root}", *extra]


def env() -> dict[str, str]:
    return {**{name: value for name, value in os.environ.items() if not name.startswith(("RANK", "SLURM_"))},
            "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}


def pids_mentioning(marker: str) -> list[int]:
    """Every process whose command line holds `marker`: the launcher and each rank (in their own sessions)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def latest_step(run_dir: Path) -> int | None:
    latest = run_dir / "checkpoints" / "latest"
    return int(latest.read_text().split("-")[1]) if latest.is_file() else None


def preempt_after_first_checkpoint(command: list[str], run_dir: Path, processes: int) -> tuple[int, int, str]:
    """Start `command`, SIGTERM all its processes once `latest` exists; (first step, exit code, stderr)."""
    process = subprocess.Popen(command, env=env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while latest_step(run_dir) is None:
            assert process.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
            time.sleep(0.05)
        first = latest_step(run_dir)
        pids = pids_mentioning(f"run_root={run_dir.parent}")
        while len(pids) != processes and time.monotonic() < deadline:  # workers come and go with each loader
            time.sleep(0.01)
            pids = pids_mentioning(f"run_root={run_dir.parent}")
        assert len(pids) == processes, pids
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    return first, process.returncode, stderr


def assert_preempted_and_resumable(first: int, code: int, stderr: str, run_dir: Path, nproc: int,
                                   shards: Path) -> None:
    assert code == 0, stderr[-3000:]
    saved = latest_step(run_dir)
    assert saved > first, f"no checkpoint after the notice (latest still step {first})"
    notices = [line for line in stderr.splitlines() if line.startswith("preempted:")]
    assert len(notices) == 1 and f"step-{saved:08d}" in notices[0] and "--resume auto" in notices[0], stderr[-3000:]
    checkpoint = run_dir / "checkpoints" / f"step-{saved:08d}"
    epoch = json.loads((checkpoint / "trainer.json").read_text())["trainer"]["epoch"]
    rerun = run_training(nproc, CONFIG, overrides(shards, run_dir.parent, *STILL_RUNNING, f"train.epochs={epoch + 1}"),
                         resume="auto", timeout=240)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from {checkpoint} at epoch {epoch}, step {saved}" in rerun.stderr, rerun.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    resumes = [record for record in records if record["kind"] == "resume"]
    assert [record["step"] for record in resumes] == [saved], resumes


def test_sigterm_to_every_process_of_a_torchrun_job_checkpoints_and_exits_0(shards, tmp_path):
    run_dir = tmp_path / "runs" / "test_tiny"
    command = train_command(2, CONFIG, overrides(shards, tmp_path / "runs", *STILL_RUNNING), resume="none")
    first, code, stderr = preempt_after_first_checkpoint(command, run_dir, processes=3)
    assert_preempted_and_resumable(first, code, stderr, run_dir, 2, shards)


@pytest.mark.parametrize("workers", [0, 1])
def test_sigterm_to_a_plain_run_checkpoints_and_exits_0(workers, shards, tmp_path):
    """With a DataLoader worker, SIGTERM reaches it too (SLURM signals every process of the step)."""
    run_dir = tmp_path / "runs" / "test_tiny"
    command = [sys.executable, "-m", "dist_train.main", "--config", CONFIG, "--resume", "none", "--set",
               *overrides(shards, tmp_path / "runs", *STILL_RUNNING, f"data.workers={workers}")]
    first, code, stderr = preempt_after_first_checkpoint(command, run_dir, processes=1 + workers)
    assert_preempted_and_resumable(first, code, stderr, run_dir, 1, shards)
