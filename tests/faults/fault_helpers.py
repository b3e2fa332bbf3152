"""Shared pieces of the fault matrix (tests/faults/): tiny runs, in-process and as real processes.

Every run here trains timm's `test_efficientnet` (0.1 M parameters, 1.8 MB checkpoints) on 32 px
images, so a run costs little more than Python's imports. Runs that must die (SIGKILL, injected
faults) or that need their own environment are real processes (`python -m dist_train.main`, or
`launch/train.py` under torchrun for two ranks); runs that only have to fail at start-up call
`dist_train.main.main(argv)` in this process: the same function the CLI exits with.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from run_helpers import consolidated_weights, train_command

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs" / "test_tiny.yaml")
BACKBONE = "test_efficientnet"
"""timm's tiny test network: the fault paths do not depend on the model's size, only the wall time does."""

_INHERITED_NOT_WANTED = ("DIST_TRAIN_FAULT", "DIST_TRAIN_FAULT_RANK", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                         "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
                         "SLURM_LOCALID", "SLURM_JOB_ID")


def overrides(shards: Path, run_root: Path, *extra: str) -> list[str]:
    """--set values for the tiny preset: shard paths, run root, the tiny backbone, then `extra`."""
    return [f"data.train_shards={shards}/train-*.tar", f"data.val_shards={shards}/val-*.tar",
            f"run_root={run_root}", f"model.backbone={BACKBONE}", *extra]


def run_env(fault: str | None = None, fault_rank: int | None = None, **extra: str) -> dict[str, str]:
    """The environment of a test run: this one without rank or fault variables, plus the given ones."""
    env = {name: value for name, value in os.environ.items() if name not in _INHERITED_NOT_WANTED}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    if fault:
        env["DIST_TRAIN_FAULT"] = fault
    if fault_rank is not None:
        env["DIST_TRAIN_FAULT_RANK"] = str(fault_rank)
    env.update(extra)
    return env


def main_command(run_overrides: list[str], resume: str = "auto") -> list[str]:
    return [sys.executable, "-m", "dist_train.main", "--config", CONFIG, "--resume", resume,
            "--set", *run_overrides]


def torchrun_command(nproc: int, run_overrides: list[str], resume: str = "auto") -> list[str]:
    """launch/train.py, which starts torchrun on itself for more than one rank."""
    return train_command(nproc, CONFIG, run_overrides, resume)


def run_process(command: list[str], env: dict[str, str] | None = None, timeout: int = 240):
    """Run to the end; returns the CompletedProcess (stdout and stderr as text)."""
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env or run_env(),
                          cwd=REPO)


def run_main(run_overrides: list[str], resume: str = "auto", fault: str | None = None, timeout: int = 240, **env):
    """One single-process training run, `python -m dist_train.main`, optionally with an injected fault."""
    return run_process(main_command(run_overrides, resume), run_env(fault, **env), timeout)


def main_in_process(argv: list[str]) -> tuple[int, str]:
    """`dist_train.main.main(argv)` here: (exit code, stderr), as `sys.exit(main())` would end.

    An exception escaping main() is what the CLI would print as a traceback with exit code 1, so it
    is returned the same way. The logging setup main() installs is undone afterwards.
    """
    from dist_train.main import main

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(argv)
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
            except KeyboardInterrupt:
                raise
            except BaseException:  # torch's CheckpointException derives from BaseException
                traceback.print_exc(file=sys.stderr)
                code = 1
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    return code, stderr.getvalue()


def main_argv(run_overrides: list[str], resume: str = "none", config: str = CONFIG) -> list[str]:
    return ["--config", config, "--resume", resume, "--set", *run_overrides]


# ---------------------------------------------------------------- processes


def rank_pid(marker: str, rank: int) -> int | None:
    """The pid of the rank process (torchrun child or direct) whose command line holds `marker`."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if marker not in (proc / "cmdline").read_bytes().decode(errors="replace"):
                continue
            variables = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in variables:
            return int(proc.name)
    return None


def wait_for_step(checkpoints: Path, min_step: int, process: subprocess.Popen, timeout: float = 180) -> int:
    """Wait until `latest` names a step >= min_step; returns that step."""
    latest = checkpoints / "latest"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if latest.is_file():
            step = int(latest.read_text().split("-")[1])
            if step >= min_step:
                return step
        if process.poll() is not None:
            raise AssertionError(f"the run ended (exit {process.returncode}) before checkpoint step {min_step}")
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint step >= {min_step} within {timeout} s")


def stop_group(process: subprocess.Popen) -> None:
    """SIGKILL a process started with start_new_session=True and everything in its group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        process.wait(timeout=30)


# ---------------------------------------------------------------- run directories


def tree_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path (symlinks and folders by name only)."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def pointer(checkpoints: Path, name: str = "latest") -> str | None:
    path = checkpoints / name
    return path.read_text().strip() if path.is_file() else None


def checkpoint_problems(folder: Path) -> list[str]:
    """Why `folder` is not a complete DCP checkpoint (empty when it is one)."""
    problems = []
    if not folder.is_dir():
        return [f"{folder.name} does not exist"]
    if folder.name.endswith(".tmp"):
        problems.append(f"{folder.name} is a staging folder")
    for required in ("trainer.json", ".metadata"):
        if not (folder / required).is_file():
            problems.append(f"{folder.name} has no {required}")
    if not list(folder.glob("*.distcp")):
        problems.append(f"{folder.name} has no tensor file")
    if (folder / "trainer.json").is_file():
        state = json.loads((folder / "trainer.json").read_text())
        if f"step-{state['trainer']['step']:08d}" != folder.name:
            problems.append(f"{folder.name}/trainer.json is for step {state['trainer']['step']}")
    return problems


def load_weights(folder: Path, scratch: Path) -> dict:
    """The model tensors of a checkpoint, read through torch's own DCP consolidation."""
    scratch.parent.mkdir(parents=True, exist_ok=True)
    weights = consolidated_weights(folder, scratch)
    scratch.unlink()
    return weights


def records(run_dir: Path, kind: str | None = None) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    parsed = [json.loads(line) for line in lines]
    return [record for record in parsed if kind is None or record["kind"] == kind]


def text_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@dataclass
class Outcome:
    """What a finished (or killed) process left: exit code, output, and facts read right after it."""

    returncode: int
    output: str
    facts: dict
