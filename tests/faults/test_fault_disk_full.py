"""Scenario 3: the checkpoint directory fills up (a 4 MB tmpfs) during the third checkpoint write.

Each checkpoint of the tiny model takes 1.8 MB, so two fit and the third write fails with ENOSPC.
Needs permission to mount a tmpfs (root in the test container); skipped with the reason otherwise.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from fault_helpers import Outcome, checkpoint_problems, load_weights, overrides, pointer, run_main, text_lines

pytestmark = pytest.mark.slow

TMPFS_SIZE = "4m"


@pytest.fixture(scope="module")
def disk_full(tmp_path_factory, make_shards) -> Outcome:
    shards = make_shards().root
    run_root = tmp_path_factory.mktemp("disk_full")
    checkpoints = run_root / "test_tiny" / "checkpoints"
    checkpoints.mkdir(parents=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(checkpoints)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a {TMPFS_SIZE} tmpfs as the checkpoint directory: {mount.stderr.strip()}")
    try:
        result = run_main(overrides(shards, run_root, "train.epochs=2", "checkpoint.every_steps=1"), resume="none")
        latest = pointer(checkpoints)
        facts = {"latest": latest, "folders": sorted(p.name for p in checkpoints.glob("step-*")),
                 "latest_problems": checkpoint_problems(checkpoints / latest) if latest else ["no latest"],
                 "summary": (run_root / "test_tiny" / "summary.json").read_text()}
        try:
            weights = load_weights(checkpoints / latest, run_root / "scratch" / "latest.pt")
            facts["loaded_tensors"] = len(weights)
        except Exception as error:  # recorded, asserted below
            facts["load_error"] = f"{type(error).__name__}: {error}"
    finally:
        subprocess.run(["umount", str(checkpoints)], check=False)
    return Outcome(result.returncode, result.stderr, facts)


def test_disk_full_stops_the_run_and_keeps_the_previous_checkpoint(disk_full):
    """The run exits non-zero, says why, and `latest` still names a complete checkpoint that loads."""
    assert disk_full.returncode == 1, disk_full.output[-3000:]
    assert "No space left on device" in disk_full.output
    facts = disk_full.facts
    assert facts["latest"] == "step-00000002", facts
    assert facts["latest_problems"] == [] and facts.get("loaded_tensors"), facts
    assert '"exit_code": 1' in facts["summary"], "the run did not record its failure in summary.json"


def test_disk_full_error_is_one_clear_line(disk_full):
    """The last line says which checkpoint could not be written and why, without a traceback."""
    assert "Traceback" not in disk_full.output, disk_full.output[-3000:]
    last = text_lines(disk_full.output)[-1]
    assert last.startswith("error:") and "step-00000003" in last and "No space left on device" in last, last
    assert str(Path("test_tiny") / "checkpoints") in last, last
