"""Scenarios 1, 9 (and 2 with two ranks): a rank dies or stalls; the job ends quickly and resumes on 1 or 2 ranks.

What happens underneath (gloo on CPU): when a rank is SIGKILLed its sockets close, so the survivor's
next collective fails at once ("Connection reset by peer"), and torchrun tears the group down as
soon as it sees the dead child. A rank that *stalls* (SIGSTOP: no socket closes) is only noticed by
the process-group timeout, `engine.timeout_s`; that is the case the timeout exists for.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from fault_helpers import (
    REPO,
    Outcome,
    checkpoint_problems,
    main_command,
    overrides,
    pointer,
    rank_pid,
    records,
    run_env,
    run_main,
    run_process,
    stop_group,
    torchrun_command,
    wait_for_step,
)

from conftest import free_port
from run_helpers import kill_processes_mentioning

pytestmark = pytest.mark.slow

TIMEOUT_S = 20
"""engine.timeout_s of these runs: the bound on how long a stalled peer can hold the job."""
TORCHRUN_GRACE_S = 30
"""torchrun's SIGTERM-to-SIGKILL grace for the other workers when one fails."""
EXTRA = ("train.epochs=2", "checkpoint.every_steps=1", f"engine.timeout_s={TIMEOUT_S}")


@pytest.fixture(scope="module")
def shards(make_shards) -> Path:
    return make_shards(train=[32, 32], val=[16]).root


@pytest.fixture(scope="module")
def rank_death(shards, tmp_path_factory):
    """Two ranks under torchrun; rank 1 is SIGKILLed once the first mid-epoch checkpoint is published."""
    run_root = tmp_path_factory.mktemp("rank_death")
    checkpoints = run_root / "test_tiny" / "checkpoints"
    marker = f"run_root={run_root}"
    log = run_root / "launcher.log"  # a file, not a pipe: nobody reads a pipe while the run goes on
    with open(log, "w") as sink:
        process = subprocess.Popen(torchrun_command(2, overrides(shards, run_root, *EXTRA), resume="none"),
                                   env=run_env(), stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_step(checkpoints, 1, process)
        victim = rank_pid(marker, 1)
        assert victim is not None, "rank 1's process not found"
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        process.wait(timeout=TIMEOUT_S + TORCHRUN_GRACE_S + 60)
        seconds = time.monotonic() - killed_at
        leftover = [rank_pid(marker, rank) for rank in (0, 1)]
    except BaseException:
        stop_group(process)
        kill_processes_mentioning(marker)
        raise
    latest = pointer(checkpoints)
    yield Outcome(process.returncode, log.read_text(), {
        "seconds_to_exit": seconds, "latest": latest, "latest_problems": checkpoint_problems(checkpoints / latest),
        "run_root": run_root, "leftover_ranks": leftover})
    kill_processes_mentioning(marker)  # ranks run in their own sessions: never leave one behind


@pytest.fixture(scope="module")
def world_size_chain(rank_death, shards) -> dict[str, Outcome]:
    """After the 2-rank run died, three more legs on the same run directory, each resuming the last:

    2 ranks, rank 1 SIGKILLed during its second checkpoint write (after its tensors, before the
    barrier); then 1 rank, killed at the start of its third checkpoint; then 2 ranks to the end.
    """
    run_root = rank_death.facts["run_root"]
    checkpoints = run_root / "test_tiny" / "checkpoints"
    run_overrides = overrides(shards, run_root, *EXTRA)
    legs: dict[str, Outcome] = {}
    partial = run_process(torchrun_command(2, run_overrides, resume="auto"), timeout=300,
                          env=run_env("kill@checkpoint.after_tensors#2", fault_rank=1))
    latest = pointer(checkpoints)
    legs["partial_write"] = Outcome(partial.returncode, partial.stdout + partial.stderr, {
        "latest": latest, "latest_problems": checkpoint_problems(checkpoints / latest),
        "folders": sorted(path.name for path in checkpoints.glob("step-*"))})
    one = run_main(run_overrides, resume="auto", fault="kill@checkpoint.before_tensors#3")
    legs["one_rank"] = Outcome(one.returncode, one.stderr, {"latest": pointer(checkpoints)})
    two = run_process(torchrun_command(2, run_overrides, resume="auto"), timeout=300)
    legs["two_ranks"] = Outcome(two.returncode, two.stdout + two.stderr, {"latest": pointer(checkpoints)})
    return legs


def test_sigkill_of_one_rank_ends_the_job_quickly(rank_death):
    """Scenario 1: the launcher exits non-zero within the bound, names the dead rank, leaves no rank behind."""
    assert rank_death.returncode != 0, rank_death.output[-3000:]
    # torchrun notices the dead child within its 0.1 s monitor interval; nobody waits for the PG timeout
    assert rank_death.facts["seconds_to_exit"] < TIMEOUT_S, rank_death.facts
    # torchrun's own report names the dead worker and its signal; the survivor's traceback says why it stopped
    assert "local_rank: 1" in rank_death.output and "exitcode: -9" in rank_death.output, rank_death.output[-3000:]
    assert "error: rank 1" in rank_death.output and "killed by signal SIGKILL" in rank_death.output
    assert rank_death.facts["leftover_ranks"] == [None, None]
    assert rank_death.facts["latest_problems"] == [], rank_death.facts


def test_launcher_error_line_names_the_dead_rank(rank_death):
    """Scenario 1: the launcher's last line says which rank died and how, e.g. 'rank 1 ... SIGKILL'."""
    last = [line for line in rank_death.output.splitlines() if line.startswith("error:")][-1]
    assert "rank 1" in last and "SIGKILL" in last, last


def test_rerun_after_rank_death_resumes_from_last_checkpoint(rank_death, world_size_chain):
    """Scenario 1: `--resume auto` continues from the checkpoint `latest` named when the rank died."""
    rerun = world_size_chain["partial_write"]
    latest_at_death = rank_death.facts["latest"]
    assert f"resumed from {rank_death.facts['run_root']}/test_tiny/checkpoints/{latest_at_death}" in rerun.output, \
        rerun.output[-3000:]


def test_sigkill_of_one_rank_during_a_two_rank_checkpoint_write(world_size_chain):
    """Scenario 2 with 2 ranks: rank 1 dies after writing its tensors; nothing half-written is published."""
    leg = world_size_chain["partial_write"]
    assert leg.returncode != 0, leg.output[-3000:]
    assert "local_rank: 1" in leg.output and "exitcode: -9" in leg.output, leg.output[-3000:]
    facts = leg.facts
    assert facts["latest_problems"] == [], facts
    interrupted = f"step-{int(facts['latest'].split('-')[1]) + 1:08d}"
    assert f"{interrupted}.tmp" in facts["folders"] and interrupted not in facts["folders"], facts
    # ... and the next leg (1 rank) resumes from it
    assert f"checkpoints/{facts['latest']} at epoch" in world_size_chain["one_rank"].output


def test_resume_on_world_size_2_then_1_then_2(rank_death, world_size_chain):
    """Scenario 9 (DDP): 2 ranks -> 1 rank -> 2 ranks completes, and metrics.jsonl is one continuing history."""
    one, two = world_size_chain["one_rank"], world_size_chain["two_ranks"]
    assert one.returncode == -signal.SIGKILL, one.output[-3000:]  # stopped on purpose at its third checkpoint
    assert two.returncode == 0, two.output[-3000:]
    run_dir = rank_death.facts["run_root"] / "test_tiny"
    resumes = [(r["saved_world_size"], r["world_size"], r["step"]) for r in records(run_dir, "resume")]
    assert [sizes[:2] for sizes in resumes] == [(2, 2), (2, 1), (1, 2)], resumes
    assert resumes[1][2] < resumes[2][2], "the 1-rank leg made no progress"
    steps = [r["step"] for r in records(run_dir, "train")]
    assert steps == sorted(set(steps)), f"steps repeat or go back: {steps}"
    summaries = records(run_dir, "summary")
    assert len(summaries) == 1 and summaries[0]["exit_code"] == 0 and summaries[0]["epochs_done"] == 2
    assert summaries[0]["world_size"] == 2 and steps[-1] == summaries[0]["steps"]
    assert [r["epoch"] for r in records(run_dir, "eval")] == [0, 1]
    assert checkpoint_problems(run_dir / "checkpoints" / two.facts["latest"]) == []


def test_stalled_rank_hits_the_process_group_timeout(shards, tmp_path):
    """Scenario 1, the hang case: a SIGSTOPped peer closes no socket; the survivor must give up after timeout_s.

    Ranks are started directly (RANK/WORLD_SIZE/MASTER_*), as srun would, so no launcher can end the
    job for them: only the configured process-group timeout stands between the survivor and a hang.
    """
    timeout_s = 10
    run_root = tmp_path / "stall"
    command = main_command(overrides(shards, run_root, "train.epochs=2", "checkpoint.every_steps=1",
                                     f"engine.timeout_s={timeout_s}"), resume="none")
    port = str(free_port())
    logs = [tmp_path / f"rank{rank}.log" for rank in (0, 1)]
    ranks = []
    for rank, log in enumerate(logs):
        with open(log, "w") as sink:
            ranks.append(subprocess.Popen(command, env=run_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                                                               MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                                          cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True))
    try:
        wait_for_step(run_root / "test_tiny" / "checkpoints", 1, ranks[0])
        os.kill(ranks[1].pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        ranks[0].wait(timeout=timeout_s + 60)
        seconds = time.monotonic() - stopped_at
    finally:
        for process in ranks:
            stop_group(process)
    stderr = logs[0].read_text()
    assert ranks[0].returncode not in (0, None), stderr[-3000:]
    assert seconds < timeout_s + 30, f"rank 0 took {seconds:.0f} s with engine.timeout_s={timeout_s}"
    assert "Timed out" in stderr or "timed out" in stderr, stderr[-3000:]


def test_a_rank_that_aborts_says_where_it_was(shards, tmp_path):
    """A C++ std::terminate in a backend is a SIGABRT (CI once saw "terminate called without an active
    exception" end a gloo rank and nothing more): the rank's stderr now names the Python line it was on."""
    result = run_main(overrides(shards, tmp_path, "train.epochs=1", "checkpoint.every_steps=1"), resume="none",
                      fault="abort@checkpoint.before_publish")
    assert result.returncode == -signal.SIGABRT, result.stderr[-2000:]
    assert "Fatal Python error: Aborted" in result.stderr, result.stderr[-2000:]
    assert "dist_train/train/checkpoint.py" in result.stderr and "dist_train/main.py" in result.stderr
