"""`shards/build.py --preset 384|512|768`: shards at the resolutions users train at, built and trained on.

Oracles: the presets' figures as the help text and README state them (written out here by hand), the stored
JPEGs' own sizes read with PIL from the tar files, and a real training step of the Trainer on each set.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from dist_train.shards.synthetic import generate
from dist_train.train.distributed import DistEnv
from dist_train.train.loop import Trainer

from conftest import ShardSet
from run_helpers import REPO, tiny_config

SHARD_SIZES = {384: 5000, 512: 3000, 768: 1500}
"""Samples per shard of each preset, as documented."""
_spec = importlib.util.spec_from_file_location("shards_build_cli", REPO / "shards" / "build.py")
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)


def build(labels: Path, out: Path, *options) -> None:
    argv = ["--images", labels.parent, "--labels", labels, "--out", out, "--workers", "1", "--val-fraction", "0.34",
            *options]
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli.main([str(a) for a in argv])
    assert code == 0, stderr.getvalue()


def stored_sizes(out: Path) -> set[tuple[int, int]]:
    sizes = set()
    for path in out.glob("*.tar"):
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".jpg"):
                    sizes.add(Image.open(io.BytesIO(tar.extractfile(member).read())).size)
    return sizes


@pytest.fixture(scope="module")
def labels(tmp_path_factory) -> Path:
    """Six photographs a little larger than the largest preset, so no preset upsamples."""
    return generate(tmp_path_factory.mktemp("images"), 6, positive_rate=0.5, size=800, seed=2)


@pytest.mark.parametrize("preset", sorted(SHARD_SIZES))
def test_each_preset_builds_at_its_size_and_trains_a_step(labels, tmp_path, preset):
    out = tmp_path / "shards"
    build(labels, out, "--preset", preset)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["preprocessing"]["size"] == preset and manifest["sharding"]["shard_size"] == SHARD_SIZES[preset]
    assert stored_sizes(out) == {(preset, preset)}
    cfg = tiny_config(ShardSet(out), tmp_path / "runs", "model.backbone=test_efficientnet",
                      f"data.image_size={preset}", "train.batch_size=2", "train.steps_per_epoch=1", "train.epochs=1",
                      "eval.batch_size=2")
    trainer = Trainer(cfg, DistEnv())
    summary = trainer.train()
    assert trainer.state.step == 1 and summary["warnings"] == []


def test_explicit_size_and_shard_size_override_the_preset(labels, tmp_path):
    out = tmp_path / "shards"
    build(labels, out, "--preset", "768", "--size", "96", "--shard-size", "2")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["preprocessing"]["size"] == 96 and manifest["sharding"]["shard_size"] == 2
    assert stored_sizes(out) == {(96, 96)}
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "train-000001.tar", "val-000000.tar"]


def test_without_a_preset_the_defaults_stay_512_px_and_1000_samples(labels, tmp_path):
    out = tmp_path / "shards"
    build(labels, out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["preprocessing"]["size"] == 512 and manifest["sharding"]["shard_size"] == 1000
