"""Scenarios 5 and 10: bad configurations, and a second job on a run directory that is in use.

Both fail before training starts, so they call the CLI's own function, `dist_train.main.main(argv)`
(and `launch/train.py`'s `launch(argv)`), in this process: the exit code is what the CLI returns.
The promise for bad input: exit code 2, one line on stderr naming the key, nothing written.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import io
from pathlib import Path

import pytest
from fault_helpers import REPO, main_argv, main_in_process, overrides, text_lines, tree_hashes


@pytest.fixture(scope="module")
def shards(make_shards) -> Path:
    return make_shards().root


def _assert_refused_in_one_line(code: int, stderr: str, run_root: Path, *named: str) -> None:
    assert code == 2, stderr[-2000:]
    lines = text_lines(stderr)
    assert len(lines) == 1, f"expected one line, got {len(lines)}:\n" + "\n".join(lines[-20:])
    assert all(word in lines[0] for word in named), lines[0]
    assert not run_root.exists(), f"written although the config was refused: {sorted(run_root.rglob('*'))}"


BAD_SETTINGS = {
    "unknown_key": (["train.epochz=3"], ("--set", "train.epochz", "unknown key", "train.epochs")),
    "wrong_type": (["train.batch_size=eight"], ("train.batch_size", "expected int", "eight")),
    "out_of_range": (["optim.lr=0"], ("optim.lr", "outside")),
    "inconsistent_schedule": (["train.epochs=2", "unfreeze.phases=[{from_epoch: 0, train: head}, "
                               "{from_epoch: 5, train: all}]"], ("unfreeze.phases[1].from_epoch", "never run")),
    "bad_choice": (["engine.kind=horovod"], ("engine.kind", "horovod")),
}


@pytest.mark.parametrize("case", sorted(BAD_SETTINGS))
def test_bad_setting_is_refused_in_one_line(shards, tmp_path, case):
    settings, named = BAD_SETTINGS[case]
    run_root = tmp_path / "runs"
    code, stderr = main_in_process(main_argv(overrides(shards, run_root, *settings)))
    _assert_refused_in_one_line(code, stderr, run_root, "config error:", *named)


def test_unknown_key_in_a_config_file_names_the_file(shards, tmp_path):
    preset = tmp_path / "typo.yaml"
    preset.write_text(f"base: {REPO / 'configs' / 'test_tiny.yaml'}\ntrain:\n  epohcs: 3\n")
    run_root = tmp_path / "runs"
    code, stderr = main_in_process(main_argv(overrides(shards, run_root), config=str(preset)))
    _assert_refused_in_one_line(code, stderr, run_root, str(preset), "train.epohcs", "train.epochs")


def test_launcher_refuses_a_bad_config_before_starting_ranks(shards, tmp_path):
    """launch/train.py --nproc-per-node 2 validates first: exit 2 and no torchrun."""
    spec = importlib.util.spec_from_file_location("launch_train", REPO / "launch" / "train.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    run_root = tmp_path / "runs"
    argv = ["--nproc-per-node", "2", *main_argv(overrides(shards, run_root, "train.batch_size=-1"))]
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = launcher.launch(argv)
    _assert_refused_in_one_line(code, stderr.getvalue(), run_root, "config error:", "train.batch_size")


def test_missing_shards_path_is_refused_before_anything_is_written(shards, tmp_path):
    run_root = tmp_path / "runs"
    missing = tmp_path / "no_such_folder" / "train-*.tar"
    code, stderr = main_in_process(main_argv(overrides(shards, run_root, f"data.train_shards={missing}")))
    _assert_refused_in_one_line(code, stderr, run_root, "data.train_shards", str(missing))


def test_nonexistent_backbone_is_refused_before_anything_is_written(shards, tmp_path):
    run_root = tmp_path / "runs"
    code, stderr = main_in_process(main_argv(overrides(shards, run_root, "model.backbone=efficientnet_b99")))
    _assert_refused_in_one_line(code, stderr, run_root, "model.backbone", "efficientnet_b99")


def test_second_job_on_a_locked_run_directory_refuses(shards, tmp_path):
    """Scenario 10: while a job holds the run directory's lock, a second one exits non-zero naming the lock."""
    run_root = tmp_path / "runs"
    run_dir = run_root / "test_tiny"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("the first job's config\n")
    with open(run_dir / ".lock", "a+") as first_job:
        fcntl.flock(first_job, fcntl.LOCK_EX | fcntl.LOCK_NB)
        first_job.write("4242\n")
        first_job.flush()
        before = tree_hashes(run_dir)
        code, stderr = main_in_process(main_argv(overrides(shards, run_root), resume="auto"))
        after = tree_hashes(run_dir)
    assert code == 2, stderr[-2000:]
    error = [line for line in text_lines(stderr) if line.startswith("error:")]
    assert error and "in use by another job" in error[0] and str(run_dir / ".lock") in error[0], stderr
    assert after == before, "the refused job changed the run directory"
    assert sorted(path.name for path in run_dir.iterdir()) == [".lock", "config.yaml"]


@pytest.mark.slow
def test_second_two_rank_job_on_a_locked_run_directory_refuses_on_every_rank(shards, tmp_path):
    """Scenario 10 with 2 ranks: rank 0 finds the lock taken and rank 1 learns it too, with no traceback."""
    from run_helpers import run_training

    run_dir = tmp_path / "runs" / "test_tiny"
    run_dir.mkdir(parents=True)
    with open(run_dir / ".lock", "a+") as first_job:
        fcntl.flock(first_job, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = run_training(2, str(REPO / "configs" / "test_tiny.yaml"), overrides(shards, tmp_path / "runs"),
                              timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    refusals = [line for line in text_lines(result.stderr) if "in use by another job" in line]
    assert len(refusals) >= 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
