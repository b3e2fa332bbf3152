"""The training commands' options: `--set` groups merge in every command, `--nproc-per-node` goes anywhere
and is in --help, and the end-of-run summary says where the report, the best checkpoint and the export are.

Each test runs the real command as a user would (`launch/train.py`, `python -m dist_train.main`,
`launch/submit.py`) on real shards.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_shards

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "test_tiny.yaml")
TRAIN = [sys.executable, str(REPO / "launch" / "train.py")]
MAIN = [sys.executable, "-m", "dist_train.main"]
SUBMIT_DRY_RUN = [sys.executable, str(REPO / "launch" / "submit.py"), "--dry-run"]
TINY = ["model.backbone=test_efficientnet", "train.epochs=1", "train.steps_per_epoch=2"]


def run(command: list[str], timeout: int = 180) -> subprocess.CompletedProcess:
    env = {name: value for name, value in os.environ.items() if not name.startswith(("RANK", "SLURM_", "MASTER_"))}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true")
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli_shards")
    write_shards(root, "train", [16])
    write_shards(root, "val", [8])
    return root


def shard_settings(shards: Path, run_root: Path) -> list[str]:
    return [f"data.train_shards={shards}/train-*.tar", f"data.val_shards={shards}/val-*.tar", f"run_root={run_root}"]


# ---------------------------------------------------------------- --set groups


@pytest.mark.parametrize("command", [TRAIN, TRAIN + ["--nproc-per-node", "2"], MAIN, SUBMIT_DRY_RUN],
                         ids=["train.py", "train.py 2 ranks", "dist_train.main", "submit.py"])
def test_every_set_group_counts_in_every_command(command, shards, tmp_path):
    """The first group's mistake is caught although a second --set follows it (argparse kept only the last)."""
    settings = shard_settings(shards, tmp_path / "runs")
    result = run([*command, "--config", CONFIG, "--set", "train.batch_size=-1", "--set", *settings])
    errors = lines(result.stderr)
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-2000:]
    assert "train.batch_size" in errors[0] and "--set" in errors[0], errors[0]
    assert not (tmp_path / "runs").exists()


def test_set_groups_apply_in_order_and_all_reach_the_run(shards, tmp_path):
    """Shards in one group, the run root in another and a later group overriding an earlier value: one run."""
    first, second = tmp_path / "first", tmp_path / "second"
    result = run([*TRAIN, "--config", CONFIG, "--resume", "none", "--set", *shard_settings(shards, first), *TINY,
                  "--set", f"run_root={second}", "--set", "train.steps_per_epoch=1"])
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((second / "test_tiny" / "summary.json").read_text())
    assert summary["steps"] == 1 and not first.exists()


# ---------------------------------------------------------------- --nproc-per-node


def test_nproc_per_node_is_in_help_with_its_default():
    result = run([*TRAIN, "--help"])
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "--nproc-per-node N" in text and "(default: 1" in text, result.stdout


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_a_bad_rank_count_is_one_line_exit_2(value, tmp_path):
    result = run([*TRAIN, "--config", CONFIG, f"--nproc-per-node={value}", "--set", f"run_root={tmp_path}"])
    errors = lines(result.stderr)
    assert result.returncode == 2 and len(errors) == 1, result.stderr
    assert "--nproc-per-node" in errors[0] and repr(value) in errors[0], errors[0]
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_nproc_per_node_after_the_other_options_starts_that_many_ranks(shards, tmp_path):
    run_root = tmp_path / "runs"
    result = run([*TRAIN, "--config", CONFIG, "--set", *shard_settings(shards, run_root), *TINY,
                  "--resume", "none", "--nproc-per-node=2"])
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_root / "test_tiny" / "summary.json").read_text())
    assert summary["world_size"] == 2


# ---------------------------------------------------------------- end of run


def summary_rows(stdout: str) -> dict[str, str]:
    table = stdout.split("run summary", 1)[1].splitlines()[2:]
    return dict(re.split(r"\s{2,}", row.strip(), maxsplit=1) for row in table if row.strip())


def test_summary_names_report_best_checkpoint_and_export_without_dcp_warnings(shards, tmp_path):
    run_root = tmp_path / "runs"
    run_dir = run_root / "test_tiny"
    result = run([*MAIN, "--config", CONFIG, "--resume", "none", "--set", *shard_settings(shards, run_root), *TINY,
                  "train.epochs=2", "tracking.html_report=true"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "distributed is disabled" not in result.stderr, "DCP's one-process warning reached the user"
    rows = summary_rows(result.stdout)
    best = (run_dir / "checkpoints" / "best").read_text().strip()
    assert rows["best checkpoint"] == str(run_dir / "checkpoints" / best)
    assert str(run_dir / "report.html") in rows["report"]
    assert rows["optimizer steps"] == "4" and rows["epochs done"] == "2 of 2"
    assert rows["unfreeze phases"].startswith("0 (all, ") and "{" not in result.stdout, result.stdout
    assert rows["export"] == f"python launch/export.py {run_dir}"
    exported = run(rows["export"].replace("python", sys.executable, 1).split())
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert (run_dir / "export" / "model.safetensors").is_file()


def test_summary_of_an_unfinished_unfreeze_reads_as_words(tmp_path):
    """Hand-made summary: two phases of three ran, no best checkpoint, a long wall time, no report."""
    from dist_train.config import load_config
    from dist_train.summary import format_summary

    cfg = load_config(CONFIG, ["train.epochs=6", f"run_root={tmp_path}", "tracking.html_report=false"])
    phases = [{"phase": 0, "train": "head", "trainable_params": 2081, "from_epoch": 0, "epoch": 0, "step": 0},
              {"phase": 1, "train": "last_2_blocks", "trainable_params": 1234567, "from_epoch": 2, "epoch": 2,
               "step": 40}]
    summary = {"best_record": None, "best_epoch": None, "epochs_done": 3, "steps": 61234, "wall_time_s": 7384.2,
               "images_per_s": 1234.56, "world_size": 8, "engine": "ddp", "phases_ran": phases,
               "phases_not_run": [2], "best_checkpoint": None, "run_dir": str(tmp_path / "test_tiny")}
    rows = summary_rows(format_summary(summary, cfg))
    assert rows["unfreeze phases"] == ("0 (head, 2,081 parameters) from epoch 0; 1 (last_2_blocks, 1,234,567 "
                                       "parameters) from epoch 2; not reached: 2")
    assert rows["optimizer steps"] == "61,234" and rows["epochs done"] == "3 of 6"
    assert rows["wall time"] == "2 h 3 min" and rows["images per second"] == "1234.6"
    assert rows["best checkpoint"].startswith("none") and rows["best alpha"] == "-"
    assert rows["report"].startswith("not written (tracking.html_report: false)")
    assert f"launch/report.py {tmp_path / 'test_tiny'}" in rows["report"]


class _Writes:
    """A stderr that keeps each write call apart, as the pipe two ranks share receives them."""

    def __init__(self):
        self.calls: list[str] = []

    def write(self, text: str) -> int:
        self.calls.append(text)
        return len(text)

    def flush(self) -> None:
        pass


@pytest.mark.parametrize("mistake", [["train.epochs=0"], ["checkpoint.resume={run_root}/no-such-checkpoint"]],
                         ids=["config error", "error in the run"])
def test_an_error_line_reaches_stderr_in_one_write(mistake, shards, tmp_path, monkeypatch):
    """Ranks under torchrun share one unbuffered stderr; `print` wrote the text and then the newline, and two
    ranks' lines came out joined (CI, 2026-12-01: "...NEW_NAME)error: cannot resume ..."). The oracle: the
    line and its newline are one write, which a pipe delivers whole."""
    from dist_train.main import main

    stderr = _Writes()
    monkeypatch.setattr(sys, "stderr", stderr)
    settings = [item.format(run_root=tmp_path) for item in mistake]
    assert main(["--config", CONFIG, "--set", *shard_settings(shards, tmp_path), *settings]) == 2
    errors = [call for call in stderr.calls if "error" in call]
    assert errors and all(call.endswith("\n") and call.count("\n") == 1 for call in errors), stderr.calls
