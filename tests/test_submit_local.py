"""`launch/submit.py` without a SLURM cluster: option handling, `--dry-run`, and `--local` runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist_train import slurm, submit_cli
from dist_train.config import SlurmConfig

from conftest import REPO, write_shards

SUBMIT = [sys.executable, str(REPO / "launch" / "submit.py")]
TINY = str(REPO / "configs" / "test_tiny.yaml")


def sbatch_lines(text: str) -> set[str]:
    return {line for line in text.splitlines() if line.startswith("#SBATCH")}


def test_dry_run_needs_no_slurm_and_writes_nothing(tmp_path):
    env = dict(os.environ, PATH=str(tmp_path))  # no sbatch, no srun
    env.pop("SLURM_CONF", None)
    result = subprocess.run([*SUBMIT, "--config", TINY, "--set", f"run_root={tmp_path}/runs", "--nodes", "2",
                             "--gpus-per-node", "4", "--cpus-per-task", "8", "--mem", "64", "--time", "120",
                             "--partition", "gpu", "--account", "eye", "--qos", "high", "--constraint", "a100",
                             "--job-name", "glaucoma", "--dry-run"], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert sbatch_lines(result.stdout) >= {
        "#SBATCH --nodes=2", "#SBATCH --gpus-per-node=4", "#SBATCH --ntasks-per-node=4", "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=64GB", "#SBATCH --time=120", "#SBATCH --partition=gpu", "#SBATCH --account=eye",
        "#SBATCH --qos=high", "#SBATCH --constraint=a100", "#SBATCH --job-name=glaucoma", "#SBATCH --signal=USR2@90",
        f"#SBATCH --output={tmp_path}/runs/test_tiny/submitit/%j_0_log.out"}
    assert f"name=test_tiny run_root={tmp_path}/runs" in result.stdout
    assert "nothing submitted" in result.stdout
    assert not (tmp_path / "runs").exists()


def test_sweep_is_one_array_with_a_run_per_combination(tmp_path):
    result = subprocess.run([*SUBMIT, "--config", TINY, "--set", f"run_root={tmp_path}", "--dry-run",
                             "--sweep", "optim.lr=1e-3,2e-3", "loss.gamma=1.5,2.0"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "#SBATCH --array=0-3%4" in sbatch_lines(result.stdout)
    tasks = [line for line in result.stdout.splitlines() if line.startswith("# array task")]
    assert len(tasks) == 4
    assert "run test_tiny-lr1e-3-gamma1.5 " in tasks[0] and "run test_tiny-lr2e-3-gamma2.0 " in tasks[3]
    assert all("tracking.wandb.group=test_tiny" in task for task in tasks)


def test_config_slurm_section_gives_defaults_and_options_win(tmp_path):
    preset = tmp_path / "cluster.yaml"
    preset.write_text(f"base: {TINY}\nslurm:\n  nodes: 3\n  partition: long\n  time_min: 30\n")
    result = subprocess.run([*SUBMIT, "--config", str(preset), "--set", f"run_root={tmp_path}", "--time", "45",
                             "--dry-run"], capture_output=True, text=True)
    assert {"#SBATCH --nodes=3", "#SBATCH --partition=long", "#SBATCH --time=45"} <= sbatch_lines(result.stdout)


@pytest.mark.parametrize("extra, message", [
    (["--set", "train.epochs=0"], "train.epochs"),
    (["--set", "optim.lr=fast"], "optim.lr"),
    (["--gpus-per-node", "2", "--tasks-per-node", "3"], "one task per GPU"),
    (["--sweep", "optim.lr"], "--sweep"),
    (["--sweep", "optim.lr=0"], "optim.lr"),  # every combination is validated before anything is submitted
])
def test_bad_input_exits_2_before_submitting(tmp_path, capsys, extra, message):
    assert submit_cli.cli(["--config", TINY, "--set", f"run_root={tmp_path}", "--local", *extra]) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("error: ") and message in stderr
    assert not list(tmp_path.iterdir())


def test_sweep_expansion_and_names():
    combinations = slurm.expand_sweep(["optim.lr=1e-4,2e-4", "loss.gamma=2"])
    assert combinations == [[("optim.lr", "1e-4"), ("loss.gamma", "2")], [("optim.lr", "2e-4"), ("loss.gamma", "2")]]
    assert slurm.expand_sweep([]) == [[]]
    assert slurm.sweep_run_name("v2", [("data.train_shards", "a/b*.tar")]) == "v2-train_shardsa_b_.tar"


def test_gpus_mean_one_task_each():
    resources = slurm.resolve_resources({"gpus_per_node": 4, "nodes": None}, SlurmConfig(nodes=2, tasks_per_node=1))
    assert (resources.nodes, resources.tasks_per_node, resources.gpus_per_node) == (2, 4, 4)


def test_only_rank_0_requeues_after_the_checkpoint():
    calls = []
    slurm.TrainingJob._requeue(lambda signum, frame: calls.append(signum), rank=0)
    assert calls == [signal.SIGUSR2]
    with pytest.raises(SystemExit) as leaving:
        slurm.TrainingJob._requeue(lambda signum, frame: calls.append(signum), rank=1)
    assert leaving.value.code == 0 and len(calls) == 1


def local_task_pid(job_id: str, rank: int) -> int | None:
    wanted = {f"SUBMITIT_LOCAL_JOB_ID={job_id}".encode(), f"SUBMITIT_LOCAL_GLOBALID={rank}".encode()}
    for proc in Path("/proc").iterdir():
        try:
            if wanted <= set((proc / "environ").read_bytes().split(b"\0")):
                return int(proc.name)
        except (OSError, ValueError):
            continue
    return None


def train_steps(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return max((json.loads(line)["step"] for line in lines if '"kind": "train"' in line and line.endswith("}")),
               default=0)


def wait_until(condition, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


@pytest.mark.slow
def test_local_run_preempted_on_one_rank_requeues_and_finishes(tmp_path):
    """Same code path as SLURM: the notice reaches rank 1 only, every rank checkpoints, rank 0 requeues
    through submitit (the local executor restarts the tasks) and the run resumes to the end."""
    write_shards(tmp_path / "shards", "train", [48, 48])
    write_shards(tmp_path / "shards", "val", [24])
    process = subprocess.Popen(
        [*SUBMIT, "--config", TINY, "--local", "--nodes", "2", "--tasks-per-node", "1", "--time", "15", "--wait",
         "--set", f"data.train_shards={tmp_path}/shards/train-{{000000..000001}}.tar",
         f"data.val_shards={tmp_path}/shards/val-000000.tar", f"run_root={tmp_path}/runs", "train.epochs=3"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "runs" / "test_tiny"
    try:
        wait_until(lambda: train_steps(run_dir) >= 2, 240)
        job_id = json.loads((run_dir / "submissions.jsonl").read_text())["job_id"]
        os.kill(local_task_pid(job_id, rank=1), signal.SIGUSR2)
        stdout, stderr = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(event["kind"] == "resume" for event in events)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs_done"] == 3 and summary["world_size"] == 2
