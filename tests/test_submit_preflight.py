"""`launch/submit.py` refuses what `launch/train.py` refuses (missing shards, an unknown backbone) before
anything is submitted: for `--dry-run`, `--local`, the sbatch path and every combination of a `--sweep`.

The sbatch path runs where SLURM is absent: a refusal must come before submitit looks for sbatch/srun, so
the expected answer is the preflight's one line and exit 2, not a failed submission.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, write_shards

SUBMIT = [sys.executable, str(REPO / "launch" / "submit.py")]
TINY = str(REPO / "configs" / "test_tiny.yaml")


@pytest.fixture
def good_shards(tmp_path) -> list[str]:
    """--set overrides naming shards that exist (the preflight only needs them to be there)."""
    write_shards(tmp_path / "shards", "train", [8])
    write_shards(tmp_path / "shards", "val", [8])
    return [f"data.train_shards={tmp_path}/shards/train-000000.tar",
            f"data.val_shards={tmp_path}/shards/val-000000.tar"]


def submit(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=str(tmp_path / "no-slurm-here"))  # no sbatch, no srun
    env.pop("SLURM_CONF", None)
    return subprocess.run([*SUBMIT, "--config", TINY, *args], cwd=tmp_path, capture_output=True, text=True,
                          env=env, timeout=120)


def assert_refused(result: subprocess.CompletedProcess, tmp_path: Path, *named: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert all(name in lines[0] for name in named), lines[0]
    assert "#SBATCH" not in result.stdout and "submitted" not in result.stdout
    assert sorted(path.name for path in tmp_path.iterdir()) == ["shards"], "nothing may be written"


@pytest.mark.parametrize("mode", [["--dry-run"], ["--local"], []], ids=["dry-run", "local", "sbatch"])
def test_missing_val_shards_are_refused_before_submitting(tmp_path, good_shards, mode):
    missing = f"{tmp_path}/shards/val-000009.tar"
    result = submit(tmp_path, *mode, "--set", f"run_root={tmp_path}/runs", *good_shards, f"data.val_shards={missing}")
    assert_refused(result, tmp_path, "data.val_shards", missing)


def test_unknown_backbone_is_refused_before_submitting(tmp_path, good_shards):
    result = submit(tmp_path, "--set", f"run_root={tmp_path}/runs", *good_shards, "model.backbone=resnet_nope")
    assert_refused(result, tmp_path, "model.backbone", "resnet_nope")


def test_every_sweep_combination_is_checked(tmp_path, good_shards):
    result = submit(tmp_path, "--dry-run", "--set", f"run_root={tmp_path}/runs", *good_shards,
                    "--sweep", "optim.lr=1e-3,2e-3", "model.backbone=resnet10t,resnet_nope")
    assert_refused(result, tmp_path, "model.backbone", "resnet_nope")


def test_a_sound_config_still_renders(tmp_path, good_shards):
    """The control: the same command with shards that exist and a real backbone is accepted."""
    result = submit(tmp_path, "--dry-run", "--set", f"run_root={tmp_path}/runs", *good_shards,
                    "--sweep", "model.backbone=resnet10t,resnet18d")
    assert result.returncode == 0, result.stderr
    assert "#SBATCH --array=0-1%2" in result.stdout and "nothing submitted" in result.stdout
