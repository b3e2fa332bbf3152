"""configs/retfound_vit_large.yaml and configs/retfound_green_vit_small.yaml: they resolve through the real
loader to the published settings, refuse their placeholder weights in one line, and, scaled down, train
and resume in the in-process Trainer.

Oracles: the numbers of RETFound's fine-tuning command (hand-written here), RETFound-Green's 392 px at
patch 14 (a 28 x 28 grid), the LR rule hand-computed (peak x warmup x 0.65 ** layers below the head), and
an uninterrupted run for the resumed one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_train.config import load_config
from dist_train.model.network import build_model
from dist_train.model.optim import global_batch_size, lr_scale
from dist_train.train.checkpoint import read_pointer
from dist_train.train.distributed import DistEnv
from dist_train.train.loop import Trainer

REPO = Path(__file__).resolve().parents[2]
RETFOUND = REPO / "configs" / "retfound_vit_large.yaml"
GREEN = REPO / "configs" / "retfound_green_vit_small.yaml"


def test_retfound_preset_is_the_published_fine_tuning_recipe():
    cfg = load_config(RETFOUND)
    assert (cfg.model.backbone, cfg.data.image_size, cfg.train.batch_size) == ("vit_large_patch16_224", 224, 16)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.layer_decay, cfg.optim.weight_decay) == ("adamw", 5e-3, 0.65, 0.05)
    assert (cfg.model.drop_path_rate, cfg.train.epochs, cfg.schedule.warmup_epochs) == (0.2, 50, 10)
    assert (cfg.schedule.kind, cfg.schedule.min_lr, [p.train for p in cfg.unfreeze.phases]) == ("cosine", 1e-6, ["all"])
    global_batch = global_batch_size(cfg.train.batch_size, cfg.train.accumulation_steps, 1)
    assert cfg.optim.lr * lr_scale(cfg.optim, global_batch) == pytest.approx(5e-3 * 16 / 256)  # 3.125e-4


def test_green_preset_is_dinov2_small_reg4_at_392_px_with_a_28_by_28_grid():
    cfg = load_config(GREEN)
    assert (cfg.model.backbone, cfg.data.image_size, cfg.optim.layer_decay) == ("vit_small_patch14_reg4_dinov2",
                                                                                 392, 0.65)
    with torch.device("meta"):  # the structure without 22M parameters' memory and init
        model = build_model(dataclasses.replace(cfg.model, pretrained="none"), image_size=392)
    assert model.backbone.patch_embed.grid_size == (28, 28)
    # DINOv2-reg position embeddings cover the patches only (no_embed_class): 28 x 28 of them
    assert model.backbone.num_reg_tokens == 4 and model.backbone.pos_embed.shape[1] == 28 * 28


@pytest.mark.parametrize("preset", [RETFOUND, GREEN], ids=lambda path: path.stem)
def test_placeholder_weights_are_refused_before_anything_is_written(preset, make_shards, tmp_path):
    shards = make_shards(train=[8], val=[8])
    command = [sys.executable, "-m", "dist_train.main", "--config", str(preset), "--set", *shards.overrides(),
               f"run_root={tmp_path / 'runs'}", "train.device=cpu"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.pretrained" in lines[0] and "/path/to/" in lines[0], result.stderr
    assert "does not exist" in lines[0]
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- scaled-down runs


SCALED_DOWN = {
    # RETFound's layout (avg pooling + fc_norm) at 8 blocks of width 64, 2 x 2 patches of 16 px
    RETFOUND: ("test_vit2", 32),
    # the preset's own DINOv2-reg4 ViT-S/14 (no smaller one of that family exists), 2 x 2 patches of 14 px
    GREEN: ("vit_small_patch14_reg4_dinov2", 28),
}


def scaled_down(preset: Path, shards, run_root: Path, *extra: str):
    backbone, size = SCALED_DOWN[preset]
    return load_config(preset, [*shards.overrides(), f"run_root={run_root}", "model.pretrained=none",
                                f"model.backbone={backbone}", f"data.image_size={size}", "data.workers=0",
                                "data.shuffle_buffer=16", "train.device=cpu", "train.deterministic=true",
                                "train.epochs=2", "train.steps_per_epoch=2", "train.batch_size=4",
                                "train.log_every_steps=1", "schedule.warmup_epochs=1", "eval.batch_size=16",
                                "checkpoint.keep_last=1", "tracking.progress=none", "tracking.html_report=false",
                                "tracking.wandb.enabled=false", *extra])


def train_records(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [record for record in records if record["kind"] == "train"]


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in trainer.engine.module.state_dict().items()}


def group_keys(trainer: Trainer) -> list[tuple[int, bool, int, float]]:
    return [(g["phase"], g["decay"], g["layer"], g["lr_scale"]) for g in trainer.engine.optimizer.param_groups]


def interrupted_and_resumed(preset: Path, shards, run_root: Path) -> Trainer:
    """A run stopped after its first optimizer step (a checkpoint mid-epoch), and a new Trainer resuming it."""
    first = Trainer(scaled_down(preset, shards, run_root), DistEnv())
    first.enter_phase(0)
    first.run_steps(0, 1)
    first.save_checkpoint()
    first.tracker.finish(first.summary())
    checkpoints = first.run_dir / "checkpoints"
    return Trainer(scaled_down(preset, shards, run_root), DistEnv(),
                   resume_from=checkpoints / str(read_pointer(checkpoints / "latest")))


def test_scaled_down_retfound_trains_at_the_layer_decayed_lrs_and_resumes_bitwise(make_shards, tmp_path):
    shards = make_shards(train=[16, 16], val=[12])
    whole = Trainer(scaled_down(RETFOUND, shards, tmp_path / "whole"), DistEnv())
    whole.train()
    records = train_records(whole.run_dir)
    assert len(records) == 4 and all(math.isfinite(record["loss"]) for record in records)
    peak = 5e-3 * 4 / 256  # base LR x global batch / 256
    depth = len(whole.model.backbone.blocks)  # 8: layers 0 (embeddings) .. 8 (last block), 9 (fc_norm + head)
    first = records[0]["lr"][: depth + 2]  # the decayed groups, from the head down; warmup 1 of 2 steps
    assert first == pytest.approx([peak * 0.5 * 0.65 ** k for k in range(depth + 2)], rel=1e-9)

    resumed = interrupted_and_resumed(RETFOUND, shards, tmp_path / "split")
    assert resumed.state.step == 1 and group_keys(resumed) == group_keys(whole)
    resumed.train()
    expected, got = weights(whole), weights(resumed)
    assert resumed.state.step == 4 and all(torch.equal(expected[name], got[name]) for name in expected)


def test_scaled_down_green_trains_and_resumes(make_shards, tmp_path):
    shards = make_shards(train=[16, 16], val=[12], size=28)
    fresh = group_keys(Trainer(scaled_down(GREEN, shards, tmp_path / "fresh"), DistEnv()))
    resumed = interrupted_and_resumed(GREEN, shards, tmp_path / "split")
    assert resumed.state.step == 1 and group_keys(resumed) == fresh
    assert len({layer for _, _, layer, _ in group_keys(resumed)}) == 14  # embeddings, 12 blocks, the head
    resumed.train()
    records = train_records(resumed.run_dir)
    assert resumed.state.step == 4 and [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(math.isfinite(record["loss"]) for record in records)


IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@pytest.mark.parametrize(("preset", "expected"), [(RETFOUND, IMAGENET), (GREEN, HALF)], ids=["retfound", "green"])
def test_each_preset_normalises_as_its_weights_were_trained_in_training_and_export(preset, expected, make_shards,
                                                                                   tmp_path):
    """RETFound MAE fine-tunes with ImageNet's constants, RETFound-Green's README says 0.5; timm's configs for
    these two backbones say the reverse, which the presets followed before `model.normalize`."""
    from dist_train.evaluation.inference import Predictor, export

    shards = make_shards(train=[8], val=[8], size=SCALED_DOWN[preset][1])
    trainer = Trainer(scaled_down(preset, shards, tmp_path), DistEnv())
    assert all((decoder.mean, decoder.std) == expected for decoder in trainer.decoders.values())
    trainer.enter_phase(0)
    checkpoint = trainer.save_checkpoint()
    trainer.tracker.finish(trainer.summary())
    predictor = Predictor.load(export(checkpoint, tmp_path / "model.safetensors"))
    assert (predictor.decoder().mean, predictor.decoder().std) == expected
