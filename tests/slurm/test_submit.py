"""`launch/submit.py` against the real two-node SLURM cluster of tests/slurm/local_cluster.sh.

Start it first: `tests/slurm/local_cluster.sh start && eval "$(tests/slurm/local_cluster.sh env)"`.
The training jobs (complete, preempted, unreadable shard, crashed rank, a two-run sweep) start together in
one module fixture (each node offers 4 CPUs, each job takes 1 per node) and the actions that must land
mid-run (an interrupt, a kill) run in background threads: the slowest job, not the sum, sets the wall
time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import submitit

from conftest import REPO

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif("SLURM_CONF" not in os.environ,
                       reason="SLURM_CONF is unset: start the test cluster with tests/slurm/local_cluster.sh "
                              "start and eval \"$(tests/slurm/local_cluster.sh env)\""),
]

SUBMIT = [sys.executable, str(REPO / "launch" / "submit.py")]
JOB_TIMEOUT_S = 300
HELD_STEP = 3
"""The step (of 18) the preempted and crash runs wait before for their signal: mid-epoch, after step 2,
where `interrupt_mid_run` and `kill_rank_mid_run` act."""
TWO_NODES = ["--nodes", "2", "--tasks-per-node", "1", "--cpus-per-task", "1", "--time", "15"]


@dataclass
class Launched:
    """A `submit.py --wait` process and the run it submitted."""

    process: subprocess.Popen
    run_dir: Path
    actions: list[str] = field(default_factory=list)
    driver: threading.Thread | None = None
    outcome: tuple[int, str, str] | None = None

    def finish(self) -> tuple[int, str, str]:
        """(exit code, stdout, stderr) of submit.py, waiting for it (and the thread acting on it) once."""
        if self.outcome is None:
            stdout, stderr = self.process.communicate(timeout=JOB_TIMEOUT_S)
            self.outcome = (self.process.returncode, stdout, stderr)
            if self.driver is not None:
                self.driver.join(timeout=10)
        return self.outcome

    def job_id(self, timeout_s: float = 60) -> str:
        path = self.run_dir / "submissions.jsonl"
        wait_until(path.exists, timeout_s, f"{path} to appear")
        return json.loads(path.read_text().splitlines()[-1])["job_id"]

    def folder(self) -> Path:
        return Path(json.loads((self.run_dir / "submissions.jsonl").read_text().splitlines()[-1])["folder"])


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what} after {timeout_s:.0f}s")
        time.sleep(0.2)


def train_steps(run_dir: Path) -> int:
    """The last optimizer step rank 0 logged (metrics.jsonl has a line per step here)."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(line)["step"] for line in lines if '"kind": "train"' in line and line.endswith("}")]
    return max(steps, default=0)


def rank_pid(job_id: str, rank: int) -> int | None:
    """The PID of one rank's task process, found by its SLURM environment (all nodes share this host)."""
    wanted = {f"SLURM_JOB_ID={job_id}".encode(), f"SLURM_PROCID={rank}".encode()}
    for proc in Path("/proc").iterdir():
        try:
            if b"submitit.core._submit" in (proc / "cmdline").read_bytes() and \
                    wanted <= set((proc / "environ").read_bytes().split(b"\0")):
                return int(proc.name)
        except (OSError, ValueError):
            continue
    return None


def launch(run_root: Path, name: str, shards: Path, *extra: str, options: tuple[str, ...] = (),
           fault: str = "") -> Launched:
    """`fault` goes to the job as DIST_TRAIN_FAULT (sbatch passes the environment on)."""
    args = [*SUBMIT, "--config", str(REPO / "configs" / "test_tiny.yaml"), "--run-name", name,
            *(options or TWO_NODES), "--wait", "--set", f"data.train_shards={shards}/train-{{000000..000001}}.tar",
            f"data.val_shards={shards}/val-000000.tar", f"run_root={run_root}", "train.epochs=3",
            "train.deterministic=true", "engine.timeout_s=30", *extra]
    env = {**os.environ, "DIST_TRAIN_FAULT": fault} if fault else None
    process = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return Launched(process, run_root / (f"{name}-lr1e-3" if "--sweep" in options else name))


def interrupt_mid_run(run: Launched) -> None:
    """submitit's own test hook: SIGTERM then SIGUSR2 to every task, as SLURM does on preemption.

    The run holds before its step `HELD_STEP` until the signal comes (`hold@`, dist_train/faults.py):
    on a loaded machine `scancel` took long enough for an unheld run to finish first (CI, 2026-12-01)."""
    job_id = run.job_id()
    wait_until(lambda: train_steps(run.run_dir) >= 2, 180, "the preemption run's second step")
    submitit.SlurmJob(folder=run.folder(), job_id=job_id)._interrupt()
    run.actions.append(f"interrupted at step {train_steps(run.run_dir)}")


def kill_rank_mid_run(run: Launched) -> None:
    """SIGKILL rank 1 while both ranks hold before step `HELD_STEP` (no notice comes: srun's
    --kill-on-bad-exit must end rank 0)."""
    job_id = run.job_id()
    wait_until(lambda: train_steps(run.run_dir) >= 2, 180, "the crash run's second step")
    pid = rank_pid(job_id, rank=1)
    assert pid is not None, f"rank 1 of job {job_id} not found"
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    run.actions.append(f"killed rank 1 (pid {pid})")
    wait_until(lambda: run.process.poll() is not None, JOB_TIMEOUT_S, "submit.py to report the crash")
    run.actions.append(f"submit.py ended {time.monotonic() - killed:.0f}s later")


def drive(action, run: Launched) -> None:
    """Run a mid-run action in a thread; its failure lands in `run.actions` for the test to show."""
    try:
        action(run)
    except Exception as error:  # reported by the test that reads run.actions
        run.actions.append(f"action failed: {error!r}")


@pytest.fixture(scope="module")
def shards(make_shards) -> Path:
    folder = make_shards(train=[48, 48], val=[24]).root
    (folder / "garbage-000000.tar").write_bytes(b"not a tar archive" * 64)  # exists: passes the preflight
    return folder


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory):
    run_root = tmp_path_factory.mktemp("slurm_runs")
    launched = {
        "complete": launch(run_root, "complete", shards),
        "preempted": launch(run_root, "preempted", shards, fault=f"hold@train.step.{HELD_STEP}"),
        "bad_shard": launch(run_root, "bad_shard", shards, f"data.train_shards={shards}/garbage-000000.tar"),
        "crash": launch(run_root, "crash", shards, fault=f"hold@train.step.{HELD_STEP}"),  # SLURM ends the held rank 0
        "sweep": launch(run_root, "sweep", shards, "train.epochs=1", options=(
            "--sweep", "optim.lr=1e-3,2e-3", "--nodes", "1", "--tasks-per-node", "1", "--cpus-per-task", "1")),
    }
    for name, action in (("preempted", interrupt_mid_run), ("crash", kill_rank_mid_run)):
        launched[name].driver = threading.Thread(target=drive, args=(action, launched[name]), daemon=True)
        launched[name].driver.start()
    yield launched
    for run in launched.values():  # only what a failed test left behind: a finished job may still be completing
        if run.process.poll() is None:
            run.process.kill()
            if (run.run_dir / "submissions.jsonl").exists():
                subprocess.run(["scancel", run.job_id()], capture_output=True)


def rank_logs(run: Launched) -> str:
    return "".join(path.read_text() for path in sorted(run.folder().glob("*_log.out")))


def eval_records(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{key: value for key, value in record.items() if key != "time" and not key.startswith("train_")}
            for record in records if record["kind"] == "eval"]


# ------------------------------------------------------------------ before any job


def test_dry_run_renders_a_script_that_slurm_accepts(tmp_path, shards):
    result = subprocess.run([*SUBMIT, "--config", str(REPO / "configs" / "test_tiny.yaml"), *TWO_NODES,
                             "--set", f"run_root={tmp_path}", f"data.train_shards={shards}/train-000000.tar",
                             f"data.val_shards={shards}/val-000000.tar", "--dry-run"],
                            capture_output=True, text=True, check=True)
    script = result.stdout.split("\n# run ")[0]
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --cpus-per-task=1",
                 "#SBATCH --time=15", "#SBATCH --signal=USR2@90"):
        assert line in script.splitlines()
    assert "--kill-on-bad-exit=1" in script and "submitit.core._submit" in script
    assert not (tmp_path / "test_tiny").exists(), "a dry run must write nothing"
    test_only = subprocess.run(["sbatch", "--test-only"], input=script, capture_output=True, text=True)
    assert test_only.returncode == 0, test_only.stderr
    assert "node[1-2]" in test_only.stderr  # "sbatch: Job N to start at ... on nodes node[1-2] ..."


@pytest.mark.parametrize("bad, named", [(["train.epochs=0"], "train.epochs"),
                                        (["data.val_shards={shards}/missing-000000.tar"], "missing-000000.tar")],
                         ids=["bad value", "missing shards"])
def test_config_error_exits_2_before_submitting(tmp_path, shards, bad, named):
    """A bad value, and what train.py's preflight refuses (shards that do not exist): no job is queued."""
    job_name = f"never-{os.getpid()}-{named}"
    result = subprocess.run([*SUBMIT, "--config", str(REPO / "configs" / "test_tiny.yaml"), *TWO_NODES,
                             "--job-name", job_name, "--set", f"run_root={tmp_path}",
                             f"data.train_shards={shards}/train-000000.tar", f"data.val_shards={shards}/val-000000.tar",
                             *(item.format(shards=shards) for item in bad)], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and named in result.stderr and len(result.stderr.splitlines()) == 1
    assert not list(tmp_path.iterdir())
    accounting = subprocess.run(["sacct", "-n", "-X", "--name", job_name, "-o", "JobID"], capture_output=True,
                                text=True, check=True)
    assert accounting.stdout.strip() == ""


# ------------------------------------------------------------------ the jobs


def test_two_node_run_completes_on_both_nodes(runs):
    code, stdout, stderr = runs["complete"].finish()
    assert code == 0, stderr
    assert "completed" in stdout
    logs = rank_logs(runs["complete"])
    assert "rank 0/2 on node1" in logs and "rank 1/2 on node2" in logs
    assert "best alpha" in logs  # rank 0's summary table
    summary = json.loads((runs["complete"].run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs_done"] == 3


def test_status_and_tail_find_the_job(runs):
    runs["complete"].finish()
    run_dir = str(runs["complete"].run_dir)

    def status() -> str:
        return subprocess.run([*SUBMIT, "status", run_dir], capture_output=True, text=True, check=True).stdout

    wait_until(lambda: "COMPLETED" in status(), 30, "sacct to report COMPLETED")  # accounting lags a little
    tail = subprocess.run([*SUBMIT, "tail", run_dir], capture_output=True, text=True, check=True)
    assert "best alpha" in tail.stdout


def test_preempted_run_requeues_resumes_and_matches_the_uninterrupted_one(runs):
    code, _, stderr = runs["preempted"].finish()
    assert code == 0, stderr
    assert runs["preempted"].actions[0].startswith("interrupted"), runs["preempted"].actions
    logs = (runs["preempted"].folder() / f"{runs['preempted'].job_id()}_0_log.err").read_text()
    assert "Requeued job" in logs and "resumed from" in logs
    assert f"checkpointing at step {HELD_STEP}" in logs, logs  # the signal met the held step, mid-epoch
    runs["complete"].finish()
    reference, resumed = runs["complete"].run_dir, runs["preempted"].run_dir
    assert eval_records(resumed) == eval_records(reference)
    assert (resumed / "predictions_val.csv").read_text() == (reference / "predictions_val.csv").read_text()


def status_of(run: Launched) -> subprocess.CompletedProcess:
    return subprocess.run([*SUBMIT, "status", str(run.run_dir)], capture_output=True, text=True)


def test_a_job_failing_inside_is_reported_by_its_error_line(runs):
    """The shard exists (the preflight passes) but is no tar: --wait and status name the failing rank,
    dist_train.main's exit code and its error line, not a submitit traceback."""
    code, _, stderr = runs["bad_shard"].finish()
    assert code == 1
    first = next(line for line in stderr.splitlines() if line.startswith("error: job "))
    assert "(exit code 2): cannot read shard" in first and "garbage-000000.tar" in first, stderr
    assert "Traceback" not in stderr
    wait_until(lambda: status_of(runs["bad_shard"]).returncode == 1, 30, "status to report the failure")
    head = status_of(runs["bad_shard"]).stdout.splitlines()[0]
    assert ": FAILED" in head and "garbage-000000.tar" in head, head


def test_crashed_rank_fails_the_job_instead_of_hanging(runs):
    code, _, stderr = runs["crash"].finish()
    assert runs["crash"].actions[0].startswith("killed"), runs["crash"].actions
    assert code == 1
    assert "rank 1: ended without a result" in stderr and "Traceback" not in stderr, stderr
    seconds_to_report = int(runs["crash"].actions[-1].split()[2].rstrip("s"))
    assert seconds_to_report < 60, runs["crash"].actions  # not engine.timeout_s per collective, nor forever


def test_sweep_runs_a_job_array_grouped_under_the_base_name(runs):
    code, stdout, stderr = runs["sweep"].finish()
    assert code == 0, stderr
    assert stdout.count("completed") == 2
    job_ids = sorted(line.split()[2] for line in stdout.splitlines() if line.startswith("submitted job"))
    assert job_ids[0].endswith("_0") and job_ids[1].endswith("_1") and job_ids[0][:-2] == job_ids[1][:-2]
    for name in ("sweep-lr1e-3", "sweep-lr2e-3"):
        config = (runs["sweep"].run_dir.parent / name / "config.yaml").read_text()
        assert "group: sweep" in config and f"name: {name}" in config
