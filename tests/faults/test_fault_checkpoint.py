"""Scenarios 2 and 7: SIGKILL at each point of a checkpoint write, then a NaN loss, on one run directory.

One run directory goes through a chain of single-process runs, each resuming where the last one
stopped (4 optimizer steps per epoch, a checkpoint at every step, 2 epochs):

    stage                 fault                               expected on disk afterwards
    before_tensors        kill@checkpoint.before_tensors#2    latest = step 1; step-2.tmp empty
    after_tensors         kill@checkpoint.after_tensors#2     latest = step 2; step-3.tmp without trainer.json
    before_publish        kill@checkpoint.before_publish#2    latest = step 3; step-4.tmp complete, unpublished
    before_latest         kill@checkpoint.before_latest#2     latest = best = step 4; step-5 published, unnamed
    nan                   nan_loss@5                          nothing in checkpoints/ changes (hashes)
    final                 none                                completes both epochs

`#2` kills during the second checkpoint a process writes, so every stage first publishes one.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from fault_helpers import (
    Outcome,
    checkpoint_problems,
    load_weights,
    overrides,
    pointer,
    records,
    run_main,
    tree_hashes,
)

pytestmark = pytest.mark.slow

KILL_POINTS = ("before_tensors", "after_tensors", "before_publish", "before_latest")
EXPECTED_LATEST = {"before_tensors": 1, "after_tensors": 2, "before_publish": 3, "before_latest": 4}
NAN_STEP = 5


def _facts(checkpoints: Path, scratch: Path) -> dict:
    """What a reader finds in checkpoints/ right after a stage: pointers, completeness, loadability."""
    latest = pointer(checkpoints)
    facts = {"latest": latest, "best": pointer(checkpoints, "best"),
             "folders": sorted(path.name for path in checkpoints.glob("step-*")),
             "latest_problems": checkpoint_problems(checkpoints / latest) if latest else ["no latest"]}
    try:
        weights = load_weights(checkpoints / latest, scratch / f"{latest}.pt")
        facts["latest_finite"] = all(bool(tensor.float().isfinite().all()) for tensor in weights.values()
                                     if tensor.is_floating_point())
        facts["latest_load_error"] = None
    except Exception as error:  # recorded, asserted by the tests
        facts["latest_load_error"] = f"{type(error).__name__}: {error}"
    return facts


@pytest.fixture(scope="module")
def chain(tmp_path_factory, make_shards) -> dict[str, Outcome]:
    shards = make_shards().root
    run_root = tmp_path_factory.mktemp("checkpoint_chain")
    scratch = tmp_path_factory.mktemp("checkpoint_scratch")
    checkpoints = run_root / "test_tiny" / "checkpoints"
    run_overrides = overrides(shards, run_root, "train.epochs=2", "checkpoint.every_steps=1")
    stages: dict[str, Outcome] = {}
    for index, point in enumerate(KILL_POINTS):
        result = run_main(run_overrides, resume="none" if index == 0 else "auto",
                          fault=f"kill@checkpoint.{point}#2")
        stages[point] = Outcome(result.returncode, result.stderr, _facts(checkpoints, scratch))
    before = tree_hashes(checkpoints)
    result = run_main(run_overrides, resume="auto", fault=f"nan_loss@{NAN_STEP}")
    stages["nan"] = Outcome(result.returncode, result.stderr,
                            {"before": before, "after": tree_hashes(checkpoints),
                             "train_steps": [r["step"] for r in records(run_root / "test_tiny", "train")]})
    result = run_main(run_overrides, resume="auto")
    stages["final"] = Outcome(result.returncode, result.stderr + result.stdout, _facts(checkpoints, scratch))
    stages["final"].facts["run_dir"] = run_root / "test_tiny"
    return stages


@pytest.mark.parametrize("point", KILL_POINTS)
def test_sigkill_during_checkpoint_write_keeps_latest_complete(chain, point):
    """Scenario 2: killed at `point` of its second checkpoint; `latest` names the previous, complete one."""
    stage = chain[point]
    assert stage.returncode == -signal.SIGKILL, f"the fault did not fire: {stage.output[-2000:]}"
    facts = stage.facts
    assert facts["latest"] == f"step-{EXPECTED_LATEST[point]:08d}", facts
    assert facts["latest_problems"] == [], facts
    assert facts["latest_load_error"] is None, facts
    assert facts["latest_finite"], facts
    if point in ("before_tensors", "after_tensors", "before_publish"):
        # the interrupted write is visible only as a staging folder, never under a published name
        assert f"step-{EXPECTED_LATEST[point] + 1:08d}.tmp" in facts["folders"], facts
    else:
        # renamed into place but `latest` not yet moved: complete, and ignored until re-saved on resume
        assert "step-00000005" in facts["folders"], facts


@pytest.mark.parametrize("point", KILL_POINTS[1:])
def test_resume_after_a_kill_continues_from_latest(chain, point):
    """Scenario 2: the next run resumes from the checkpoint the killed run left in `latest`."""
    previous = chain[KILL_POINTS[KILL_POINTS.index(point) - 1]].facts["latest"]
    assert f"checkpoints/{previous} at epoch" in chain[point].output, chain[point].output[-2000:]


def test_nan_loss_stops_at_once_and_leaves_checkpoints_untouched(chain):
    """Scenario 7: a NaN at step 5 stops the run before the update, exit non-zero naming the step."""
    stage = chain["nan"]
    assert stage.returncode == 1, stage.output[-2000:]
    assert f"non-finite loss at optimizer step {NAN_STEP}" in stage.output, stage.output[-2000:]
    assert chain["before_latest"].facts["best"] == "step-00000004", "no best checkpoint to protect"
    assert stage.facts["after"] == stage.facts["before"], "the NaN run changed files under checkpoints/"
    assert max(stage.facts["train_steps"]) < NAN_STEP, "a step at or after the NaN was logged"


def test_resume_after_the_chain_completes_the_run(chain):
    """Scenario 2: after four kills and a NaN stop, `--resume auto` finishes both epochs with one history."""
    final = chain["final"]
    assert final.returncode == 0, final.output[-3000:]
    assert final.facts["latest"] == "step-00000008" and final.facts["latest_problems"] == []
    assert not [name for name in final.facts["folders"] if name.endswith(".tmp")], final.facts["folders"]
    run_dir = final.facts["run_dir"]
    steps = [r["step"] for r in records(run_dir, "train")]
    assert steps == list(range(1, 9)), steps
    summaries = records(run_dir, "summary")
    assert len(summaries) == 1 and summaries[0]["exit_code"] == 0 and summaries[0]["epochs_done"] == 2
    assert summaries[0]["best_epoch"] is not None
