"""What train.py refuses before any process group starts or any file is written (exit 2, one line).

Each case runs the command's own entry, `dist_train.main.main(argv)`, on real files.
"""

from __future__ import annotations

import json

import pytest
import torch

from dist_train.main import main

from run_helpers import REPO

CONFIG = str(REPO / "configs" / "test_tiny.yaml")


def test_a_deepspeed_file_that_contradicts_train_precision_is_refused(make_shards, tmp_path, capsys):
    shards = make_shards()
    user_file = tmp_path / "ds.json"
    user_file.write_text(json.dumps({"fp16": {"enabled": True}}))
    code = main(["--config", CONFIG, "--set", *shards.overrides(), f"run_root={tmp_path / 'runs'}",
                 "engine.kind=deepspeed", "train.precision=bf16", f"engine.deepspeed_config={user_file}"])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1, error
    assert "fp16" in error[0] and "bf16" in error[0]
    assert not (tmp_path / "runs").exists()


def test_shards_of_a_build_that_stopped_midway_are_refused(make_shards, tmp_path, capsys):
    shards = make_shards()
    (shards.root / ".parts").mkdir()
    code = main(["--config", CONFIG, "--set", *shards.overrides(), f"run_root={tmp_path / 'runs'}"])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1, error
    assert "data.train_shards" in error[0] and "rerun the same build command" in error[0]
    assert not (tmp_path / "runs").exists()


def test_a_run_directory_that_cannot_be_created_is_one_line(make_shards, tmp_path, capsys):
    """run_root under a file (as an unwritable or lock-less mount would fail): rank 0's verdict, exit 2."""
    shards = make_shards()
    not_a_folder = tmp_path / "runs"
    not_a_folder.write_text("a file where the runs should go")
    code = main(["--config", CONFIG, "--set", *shards.overrides(), f"run_root={not_a_folder}"])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1, error
    assert "cannot prepare run directory" in error[0] and str(not_a_folder) in error[0]


def test_layer_decay_on_a_backbone_timm_cannot_number_is_refused(make_shards, tmp_path, capsys):
    code = main(["--config", CONFIG, "--set", *make_shards().overrides(), f"run_root={tmp_path / 'runs'}",
                 "model.backbone=pit_ti_224", "optim.layer_decay=0.65"])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1, error
    assert "optim.layer_decay" in error[0] and "group_matcher" in error[0]
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where no CUDA device is visible")
def test_train_device_cuda_where_no_gpu_is_visible_is_one_line(make_shards, tmp_path, capsys):
    """Before: a RuntimeError traceback from the rank. The oracle is torch's own is_available() (False here)."""
    code = main(["--config", CONFIG, "--set", *make_shards().overrides(), f"run_root={tmp_path / 'runs'}",
                 "train.device=cuda"])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1, error
    assert "train.device is 'cuda'" in error[0] and "train.device=auto" in error[0]
    assert not (tmp_path / "runs").exists()


def test_a_labels_csv_given_as_the_training_shards_is_refused_before_anything_is_written(make_shards, tmp_path,
                                                                                        capsys):
    """Before: it passed the preflight, config.yaml was written, then `cannot read shard …: invalid header`."""
    labels = tmp_path / "labels.csv"
    labels.write_text("challenge_id,class\nTRAIN000000,NRG\n")
    code = main(["--config", CONFIG, "--set", *make_shards().overrides(), f"data.train_shards={labels}",
                 f"run_root={tmp_path / 'runs'}"])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1, error
    assert "data.train_shards" in error[0] and f"{labels} is not a tar shard" in error[0] and "train-*.tar" in error[0]
    assert not (tmp_path / "runs").exists()
