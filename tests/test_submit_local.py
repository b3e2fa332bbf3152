"""`launch/submit.py` without a SLURM cluster: option handling, `--dry-run`, `--local` runs, and what
`--wait`, `status` and `tail -f` say of them (a failed job by its failing rank's error line)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist_train.config import SlurmConfig
from dist_train.slurm import cli, job, outcome

from conftest import REPO, write_shards

SUBMIT = [sys.executable, str(REPO / "launch" / "submit.py")]
TINY = str(REPO / "configs" / "test_tiny.yaml")


@pytest.fixture
def shard_set(tmp_path) -> list[str]:
    """--set overrides naming real shards: submit.py checks they exist before it renders or submits."""
    write_shards(tmp_path / "shards", "train", [16])
    write_shards(tmp_path / "shards", "val", [8])
    return [f"data.train_shards={tmp_path}/shards/train-000000.tar",
            f"data.val_shards={tmp_path}/shards/val-000000.tar"]


def sbatch_lines(text: str) -> set[str]:
    return {line for line in text.splitlines() if line.startswith("#SBATCH")}


def test_dry_run_needs_no_slurm_and_writes_nothing(tmp_path, shard_set):
    env = dict(os.environ, PATH=str(tmp_path))  # no sbatch, no srun
    env.pop("SLURM_CONF", None)
    result = subprocess.run([*SUBMIT, "--config", TINY, "--set", f"run_root={tmp_path}/runs", *shard_set,
                             "--nodes", "2", "--gpus-per-node", "4", "--cpus-per-task", "8", "--mem", "64",
                             "--time", "120", "--partition", "gpu", "--account", "eye", "--qos", "high",
                             "--constraint", "a100", "--job-name", "glaucoma", "--dry-run"],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert sbatch_lines(result.stdout) >= {
        "#SBATCH --nodes=2", "#SBATCH --gpus-per-node=4", "#SBATCH --ntasks-per-node=4", "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=64GB", "#SBATCH --time=120", "#SBATCH --partition=gpu", "#SBATCH --account=eye",
        "#SBATCH --qos=high", "#SBATCH --constraint=a100", "#SBATCH --job-name=glaucoma", "#SBATCH --signal=USR2@90",
        f"#SBATCH --output={tmp_path}/runs/test_tiny/submitit/%j_0_log.out"}
    assert f"name=test_tiny run_root={tmp_path}/runs" in result.stdout
    assert "nothing submitted" in result.stdout
    assert not (tmp_path / "runs").exists()


def test_sweep_is_one_array_with_a_run_per_combination(tmp_path, shard_set):
    result = subprocess.run([*SUBMIT, "--config", TINY, "--set", f"run_root={tmp_path}", *shard_set, "--dry-run",
                             "--sweep", "optim.lr=1e-3,2e-3", "loss.gamma=1.5,2.0"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "#SBATCH --array=0-3%4" in sbatch_lines(result.stdout)
    tasks = [line for line in result.stdout.splitlines() if line.startswith("# array task")]
    assert len(tasks) == 4
    assert "run test_tiny-lr1e-3-gamma1.5 " in tasks[0] and "run test_tiny-lr2e-3-gamma2.0 " in tasks[3]
    assert all("tracking.wandb.group=test_tiny" in task for task in tasks)


def test_config_slurm_section_gives_defaults_and_options_win(tmp_path, shard_set):
    preset = tmp_path / "cluster.yaml"
    preset.write_text(f"base: {TINY}\nslurm:\n  nodes: 3\n  partition: long\n  time_min: 30\n")
    result = subprocess.run([*SUBMIT, "--config", str(preset), "--set", f"run_root={tmp_path}", *shard_set,
                             "--time", "45", "--dry-run"], capture_output=True, text=True)
    assert {"#SBATCH --nodes=3", "#SBATCH --partition=long", "#SBATCH --time=45"} <= sbatch_lines(result.stdout)


@pytest.mark.parametrize("extra, message", [
    (["--set", "train.epochs=0"], "train.epochs"),
    (["--set", "optim.lr=fast"], "optim.lr"),
    (["--gpus-per-node", "2", "--tasks-per-node", "3"], "one task per GPU"),
    (["--sweep", "optim.lr"], "--sweep"),
    (["--sweep", "optim.lr=0"], "optim.lr"),  # every combination is validated before anything is submitted
])
def test_bad_input_exits_2_before_submitting(tmp_path, capsys, shard_set, extra, message):
    assert cli.cli(["--config", TINY, "--set", f"run_root={tmp_path}", *shard_set, "--local", *extra]) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("error: ") and message in stderr
    assert [path.name for path in tmp_path.iterdir()] == ["shards"]


def test_sweep_expansion_and_names():
    combinations = job.expand_sweep(["optim.lr=1e-4,2e-4", "loss.gamma=2"])
    assert combinations == [[("optim.lr", "1e-4"), ("loss.gamma", "2")], [("optim.lr", "2e-4"), ("loss.gamma", "2")]]
    assert job.expand_sweep([]) == [[]]
    assert job.sweep_run_name("v2", [("data.train_shards", "a/b*.tar")]) == "v2-train_shardsa_b_.tar"


def test_gpus_mean_one_task_each():
    resources = job.resolve_resources({"gpus_per_node": 4, "nodes": None}, SlurmConfig(nodes=2, tasks_per_node=1))
    assert (resources.nodes, resources.tasks_per_node, resources.gpus_per_node) == (2, 4, 4)


def test_only_rank_0_requeues_after_the_checkpoint():
    calls = []
    job.TrainingJob._requeue(lambda signum, frame: calls.append(signum), rank=0)
    assert calls == [signal.SIGUSR2]
    with pytest.raises(SystemExit) as leaving:
        job.TrainingJob._requeue(lambda signum, frame: calls.append(signum), rank=1)
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
    through submitit (the local executor restarts the tasks) and the run resumes to the end. Rank 1 holds
    before step 3 until its signal comes (`hold@`, dist_train/faults.py), so the signal lands mid-run however
    loaded the machine is."""
    write_shards(tmp_path / "shards", "train", [48, 48])
    write_shards(tmp_path / "shards", "val", [24])
    process = subprocess.Popen(
        [*SUBMIT, "--config", TINY, "--local", "--nodes", "2", "--tasks-per-node", "1", "--time", "15", "--wait",
         "--set", f"data.train_shards={tmp_path}/shards/train-{{000000..000001}}.tar",
         f"data.val_shards={tmp_path}/shards/val-000000.tar", f"run_root={tmp_path}/runs", "train.epochs=3"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "DIST_TRAIN_FAULT": "hold@train.step.3", "DIST_TRAIN_FAULT_RANK": "1"})
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
    logs = "".join(path.read_text() for path in (run_dir / "submitit").glob("*_log.err"))
    assert "preemption notice: checkpointing at step 3" in logs, logs[-3000:]  # the signal met the held step
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs_done"] == 3 and summary["world_size"] == 2


# ------------------------------------------------------------------ a failed job, status and tail


def submit_local(tmp_path: Path, train_shards: str, *settings: str, tasks: int = 1, env: dict | None = None,
                 wait: bool = True) -> subprocess.CompletedProcess:
    """submit.py --local; its output goes through files, since the job's controller inherits them and
    would hold a pipe open (and this call) until the job ends."""
    command = [*SUBMIT, "--config", TINY, "--local", "--tasks-per-node", str(tasks), *(["--wait"] if wait else []),
               "--set", f"data.train_shards={train_shards}", f"data.val_shards={tmp_path}/shards/val-000000.tar",
               f"run_root={tmp_path}/runs", "engine.timeout_s=30", *settings]
    with open(tmp_path / "submit.out", "w+") as stdout, open(tmp_path / "submit.err", "w+") as stderr:
        code = subprocess.run(command, cwd=REPO, stdout=stdout, stderr=stderr, timeout=240,
                              env={**os.environ, **(env or {})}).returncode
        stdout.seek(0), stderr.seek(0)
        return subprocess.CompletedProcess(command, code, stdout.read(), stderr.read())


def status(run_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*SUBMIT, "status", str(run_dir)], capture_output=True, text=True, timeout=60)


def test_failed_job_is_reported_by_its_error_line_in_wait_and_status(tmp_path, shard_set):
    """A shard that exists (the preflight passes) but is no tar: the rank stops with dist_train.main's
    `error: cannot read shard ...` and exit code 2; --wait and status say that, not a traceback."""
    bad = tmp_path / "shards" / "train-000009.tar"
    bad.write_bytes(b"this is not a tar archive" * 40)
    result = submit_local(tmp_path, str(bad))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 2, result.stderr
    first = result.stderr.splitlines()[0]
    assert first.startswith("error: job ") and "failed on rank 0 (exit code 2): " in first and str(bad) in first
    run_dir = tmp_path / "runs" / "test_tiny"
    job_id = json.loads((run_dir / "submissions.jsonl").read_text())["job_id"]
    assert f"rank 0 log: {run_dir}/submitit/{job_id}_0_log.err" in result.stderr

    report = status(run_dir)
    assert report.returncode == 1, report.stdout + report.stderr
    head = report.stdout.splitlines()[0]
    assert head.startswith(f"job {job_id} (local, ") and ": FAILED on rank 0 (exit code 2): " in head
    assert str(bad) in head and "wrote its result" not in report.stdout


def test_a_killed_rank_is_named_before_the_rank_that_lost_it(tmp_path, shard_set):
    """Rank 1 is SIGKILLed at its first checkpoint write and leaves no result; rank 0 then fails in gloo
    ("connection reset by peer"). The failing rank is 1; rank 0 only followed it."""
    fault = {"DIST_TRAIN_FAULT": "kill@checkpoint.before_tensors", "DIST_TRAIN_FAULT_RANK": "1"}
    result = submit_local(tmp_path, shard_set[0].partition("=")[2], "train.epochs=1", "engine.timeout_s=10", tasks=2,
                          env=fault)
    assert result.returncode == 1, result.stdout + result.stderr
    first = result.stderr.splitlines()[0]
    assert "failed on rank 1: ended without a result (killed" in first, result.stderr
    assert "also failed: rank 0: " in result.stderr and "Traceback" not in result.stderr


def stop_local_job(job_id: str) -> None:
    """What a failed test may leave running: the job's tasks (found by their submitit job id), then its
    controller (the job id is its pid), each by pid and only if it is still that process."""
    for rank in (1, 0):
        with contextlib.suppress(ProcessLookupError, TypeError):
            os.kill(local_task_pid(job_id, rank), signal.SIGKILL)
    with contextlib.suppress(OSError):
        if b"submitit.local._local" in Path(f"/proc/{job_id}/cmdline").read_bytes():
            os.kill(int(job_id), signal.SIGKILL)


def log_text(run_dir: Path) -> str:
    return "".join(path.read_text(errors="replace") for path in sorted((run_dir / "submitit").glob("*_0_log.*")))


def test_tail_follow_prints_the_run_as_it_goes_and_stops_at_the_end(tmp_path, shard_set):
    submitted = submit_local(tmp_path, shard_set[0].partition("=")[2], "train.epochs=3", wait=False)
    assert submitted.returncode == 0, submitted.stderr
    assert "follow with:   python launch/submit.py tail -f " in submitted.stdout
    run_dir = tmp_path / "runs" / "test_tiny"
    job_id = json.loads((run_dir / "submissions.jsonl").read_text())["job_id"]
    try:
        assert "best alpha" not in log_text(run_dir), "the run ended before tail started: nothing to follow"
        running = status(run_dir)
        follow = subprocess.run([*SUBMIT, "tail", "-f", str(run_dir)], capture_output=True, text=True, timeout=180)
    finally:
        stop_local_job(job_id)
    assert (running.returncode, running.stdout.split(": ", 1)[1].split()[0]) == (0, "RUNNING"), running.stdout
    assert follow.returncode == 0, follow.stderr
    assert "best alpha" in follow.stdout and "epoch 2" in follow.stdout  # the end of the run, followed
    assert f"job {job_id} ended" in follow.stderr
    done = status(run_dir)
    assert done.returncode == 0 and ": COMPLETED" in done.stdout.splitlines()[0], done.stdout


def test_error_line_is_what_a_person_reads_first():
    """Hand-written texts in the shapes a rank leaves: dist_train.main's own line wins over the traceback
    around it; a bare traceback gives its last exception line; torch's `[rankN]:` prefix is dropped."""
    main_said = ("INFO starting\n[rank0]: Traceback (most recent call last):\n[rank0]: RuntimeError: dist_train.main "
                 "exited with code 2 on rank 0 (vm):\n[rank0]: error: cannot read shard a.tar\nerror: a later one\n")
    assert outcome.error_line(main_said) == "cannot read shard a.tar"
    raised = ('Traceback (most recent call last):\n  File "x.py", line 1\nKeyError: 3\n\nDuring handling...\n'
              "ValueError: bad\n")
    assert outcome.error_line(raised) == "ValueError: bad"
    assert outcome.error_line("INFO all fine\nwarning: slow disk\n") is None


def test_srun_order_names_the_task_that_took_the_step_down():
    """srun's lines in the batch log, as a two-node step ends after rank 1 is killed (hand-written)."""
    log = ("srun: error: node2: task 1: Killed\nsrun: launch/slurm: _step_signal: Terminating StepId=7.0\n"
           "srun: error: node1: tasks 0,2-3: Exited with exit code 1\n")
    assert outcome.srun_reports(log) == {1: (0, "node2: task 1: Killed"),
                                             0: (1, "node1: task 0: Exited with exit code 1"),
                                             2: (1, "node1: task 2: Exited with exit code 1"),
                                             3: (1, "node1: task 3: Exited with exit code 1")}
