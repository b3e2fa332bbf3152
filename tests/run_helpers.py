"""Launching real multi-process runs (torchrun through launch/train.py) from tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def tiny_config(shards, run_root: Path, *overrides: str):
    """configs/test_tiny.yaml pointed at a `make_shards` set, deterministic, its runs under `run_root`."""
    from dist_train.config import load_config

    return load_config(str(REPO / "configs" / "test_tiny.yaml"),
                       [*shards.overrides(), f"run_root={run_root}", "train.deterministic=true", *overrides])


def train_command(nproc: int, config: str, overrides: list[str], resume: str = "auto") -> list[str]:
    return [sys.executable, str(REPO / "launch" / "train.py"), "--nproc-per-node", str(nproc), "--config", config,
            "--resume", resume, "--set", *overrides]


def run_training(nproc: int, config: str, overrides: list[str], resume: str = "auto", timeout: int = 400):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    return subprocess.run(train_command(nproc, config, overrides, resume), capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def kill_processes_mentioning(marker: str) -> int:
    """SIGKILL every process whose command line holds `marker` (torchrun starts ranks in their own sessions)."""
    killed = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                os.kill(int(proc.name), signal.SIGKILL)
                killed += 1
        except (OSError, ProcessLookupError):
            continue
    return killed


def kill_after_checkpoint(nproc: int, config: str, overrides: list[str], checkpoints: Path,
                          min_step: int, timeout: int = 300, resume: str = "none") -> int:
    """Start a run and SIGKILL the launcher and every rank once `latest` names a step >= min_step."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    process = subprocess.Popen(train_command(nproc, config, overrides, resume), env=env, cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    latest = checkpoints / "latest"
    while time.monotonic() < deadline and process.poll() is None:
        if latest.is_file() and int(latest.read_text().split("-")[1]) >= min_step:
            kill_processes_mentioning(f"run_root={checkpoints.parent.parent}")
            process.wait()
            return int(latest.read_text().split("-")[1])
        time.sleep(0.05)
    process.kill()
    raise AssertionError("the run ended or timed out before the checkpoint to kill after")


def consolidated_weights(checkpoint_dir: Path, out: Path) -> dict[str, torch.Tensor]:
    """The model tensors of a DCP checkpoint, through torch's own consolidation helper."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(checkpoint_dir), str(out))
    return torch.load(out, weights_only=True)["model"]


def latest_checkpoint(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
