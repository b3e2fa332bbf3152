"""Class-activation maps, overlays, case selection and calibration, each against an oracle of its own.

The maps are checked on hand-made models whose logit reads one known region, so where the map's mass
must lie is known without running Grad-CAM; selection on a hand-made table; calibration on a case
computed by hand.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dist_train.config import ModelConfig
from dist_train.data.augment import to_normalised_tensor
from dist_train.evaluation.calibration import reliability
from dist_train.evaluation.cases import Case, select_cases
from dist_train.evaluation.explain import (
    _vit_reshape,
    cam_maps,
    find_target,
    mass_inside_circle,
    overlay,
    rollout_grid,
    to_rgb,
    write_overlays,
)
from dist_train.model.network import build_model

SIDE = 32
ROWS, COLS = slice(0, 8), slice(16, 24)
"""The region the hand-made model reads: off the diagonal, so a transposed map would miss it."""
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Window(nn.Module):
    """Zeroes every position outside ROWS x COLS: the logit cannot depend on anything else."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros_like(features)
        mask[:, :, ROWS, COLS] = 1
        return features * mask


class RegionNet(nn.Module):
    """conv -> ReLU -> window -> mean -> linear: a logit that reads only the window's pixels."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.window = Window()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 1)
        nn.init.constant_(self.fc.weight, 1.0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.window(self.features(images))).flatten(1)).squeeze(-1)


def noise_batch(n: int = 3, seed: int = 0) -> torch.Tensor:
    """Normalised random pictures: every region has signal, so only the model decides where the map goes."""
    rng = np.random.default_rng(seed)
    return torch.stack([to_normalised_tensor(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8), MEAN, STD)
                        for _ in range(n)])


def test_the_map_lies_in_the_only_region_the_logit_reads():
    model = RegionNet().eval()
    maps = cam_maps(model, noise_batch())
    assert maps.shape == (3, SIDE, SIDE) and maps.dtype == np.float32
    assert maps.min() >= 0 and maps.max() <= 1
    inside = maps[:, ROWS, COLS].sum(axis=(1, 2)) / maps.sum(axis=(1, 2))
    region_share = (8 * 8) / SIDE**2
    assert inside.min() > 0.95, f"mass inside the read region {inside}, a uniform map gives {region_share}"


def test_the_layer_explained_is_the_last_spatial_one_or_the_one_named():
    model, images = RegionNet().eval(), noise_batch(1)
    assert find_target(model, images).name == "window"
    spread = cam_maps(model, noise_batch(), layer="features")
    inside = spread[:, ROWS, COLS].sum() / spread.sum()
    assert inside < 0.5, "Grad-CAM at the conv before the window weighs the whole image: the override took effect"


def tiny(backbone: str) -> nn.Module:
    return build_model(dataclasses.replace(ModelConfig(), backbone=backbone, pretrained="none",
                                           head_widths=(8,), head_dropout=(0.0,))).eval()


@pytest.mark.parametrize(("backbone", "layer"), [("test_efficientnet", "backbone.bn2"),
                                                 ("resnet10t", "backbone.layer4"),
                                                 ("test_vit", "backbone.blocks.")])
def test_timm_models_get_a_map_per_image_at_their_own_layer(backbone, layer):
    model, images = tiny(backbone), nn.functional.interpolate(noise_batch(2), size=64)
    assert find_target(model, images).name.startswith(layer)
    maps = cam_maps(model, images)
    assert maps.shape == (2, *images.shape[2:]) and np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1


def test_vit_tokens_land_on_their_patch_of_the_grid():
    model = tiny("test_vit")
    backbone = model.backbone
    rows, cols = backbone.patch_embed.grid_size
    prefix = backbone.num_prefix_tokens
    tokens = torch.zeros(1, prefix + rows * cols, 5)
    tokens[0, prefix:, :] = torch.arange(rows * cols, dtype=torch.float32)[:, None]
    grid = _vit_reshape(backbone)(tokens)
    assert grid.shape == (1, 5, rows, cols)
    expected = torch.arange(rows * cols, dtype=torch.float32).view(rows, cols)
    assert torch.equal(grid[0, 3], expected), "token r*cols+c must sit at row r, column c"


def test_to_rgb_gives_back_the_pixels_the_model_was_fed():
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (2, SIDE, SIDE, 3), dtype=np.uint8)
    batch = torch.stack([to_normalised_tensor(image, MEAN, STD) for image in pixels])
    assert np.array_equal(to_rgb(batch, MEAN, STD), pixels)


def test_overlay_is_an_image_of_the_same_size_and_refuses_mismatched_maps():
    rgb = np.full((SIDE, SIDE, 3), 128, np.uint8)
    cam = np.zeros((SIDE, SIDE), np.float32)
    cam[ROWS, COLS] = 1
    blended = overlay(rgb, cam)
    assert blended.shape == rgb.shape and blended.dtype == np.uint8
    hot, cold = blended[ROWS, COLS].reshape(-1, 3).mean(0), blended[20:, :8].reshape(-1, 3).mean(0)
    assert hot[0] > cold[0] + 50 and cold[2] > hot[2] + 50, "jet: red where the map is 1, blue where it is 0"
    with pytest.raises(ValueError, match="HxW map"):
        overlay(rgb, cam[:16])


def test_write_overlays_writes_one_png_per_image_nested_ids_in_folders(tmp_path):
    keys = ["TRAIN000001", "day1/img002", "TRAIN000003"]
    written = write_overlays(RegionNet().eval(), noise_batch(), keys, tmp_path, MEAN, STD)
    assert written == [tmp_path / f"{key}.png" for key in keys]
    for path in written:
        with Image.open(path) as picture:
            assert picture.format == "PNG" and picture.size == (384, 192)


def test_mass_inside_a_circle_against_hand_computed_shares():
    side = 200
    ys, xs = np.mgrid[0:side, 0:side]
    disc = (np.hypot((xs + 0.5) / side - 0.3, (ys + 0.5) / side - 0.6) <= 0.1).astype(np.float32)
    assert mass_inside_circle(disc, (0.3, 0.6), 0.1) == pytest.approx(1.0)
    assert mass_inside_circle(disc, (0.7, 0.6), 0.1) == pytest.approx(0.0)
    uniform = np.ones((side, side), np.float32)
    assert mass_inside_circle(uniform, (0.5, 0.5), 0.2) == pytest.approx(math.pi * 0.2**2, rel=0.01)


def test_select_cases_on_a_hand_made_table():
    keys = ["a", "b", "c", "d", "e", "f", "g", "h"]
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    scores = np.array([0.9, 0.7, 0.2, 0.4, 0.8, 0.6, 0.1, 0.5])
    cases = select_cases(keys, labels, scores, threshold=0.5, k=2)
    assert cases == [Case("true positive", "a", 1, 0.9), Case("true positive", "b", 1, 0.7),
                     Case("false negative", "c", 1, 0.2), Case("false negative", "d", 1, 0.4),
                     Case("false positive", "e", 0, 0.8), Case("false positive", "f", 0, 0.6)]
    at_the_threshold = select_cases(keys, labels, scores, threshold=0.5, k=5)
    assert Case("false positive", "h", 0, 0.5) in at_the_threshold, "score == threshold counts as positive"
    assert [case.key for case in select_cases(keys, labels, scores, 0.95, 3)] == ["c", "d", "b"]


def test_reliability_and_ece_on_a_hand_computed_case():
    labels = np.array([0, 1, 0, 1, 1])
    scores = np.array([0.05, 0.05, 0.15, 0.95, 0.95])
    curve = reliability(labels, scores, bins=10)
    assert curve.observed == pytest.approx([0.5, 0.0, 1.0])
    assert curve.predicted == pytest.approx([0.05, 0.15, 0.95])
    assert list(curve.counts) == [2, 1, 2]
    assert curve.ece == pytest.approx((2 * 0.45 + 1 * 0.15 + 2 * 0.05) / 5)
    perfect = reliability(np.array([0, 0, 1, 1]), np.array([0.0, 0.0, 1.0, 1.0]))
    assert perfect.ece == pytest.approx(0.0)


# ---------------------------------------------------------------- predict.py --explain


def hand_made_export(folder):
    """An export written the way `inference.export` lays it out (weights + sidecar JSON), without a run."""
    import json

    from safetensors.torch import save_file

    from dist_train.evaluation.inference import Predictor

    cfg = dataclasses.replace(ModelConfig(), backbone="resnet10t", head_widths=[8], head_dropout=[0.0])
    model = build_model(cfg).eval()
    save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()}, folder / "model.safetensors")
    meta = {"model": dataclasses.asdict(cfg), "tta": "none", "threshold": 0.5,
            "preprocess": {"image_size": 48, "clahe": True, "clahe_clip_limit": 2.0, "clahe_tile_grid": 8,
                           "mean": list(MEAN), "std": list(STD), "shard_size": 64, "shard_quality": 95}}
    (folder / "model.json").write_text(json.dumps(meta))
    return Predictor.load(folder / "model.safetensors")


def test_explain_images_writes_an_overlay_per_readable_image_from_the_scored_inputs(tmp_path):
    from dist_train.evaluation.explain_predict import _raw_sample, explain_images
    from dist_train.shards.synthetic import render_jpeg

    predictor = hand_made_export(tmp_path)
    images = {}
    for index in range(3):
        images[f"eye{index}"] = tmp_path / "in" / f"eye{index}.jpg"
        images[f"eye{index}"].parent.mkdir(exist_ok=True)
        images[f"eye{index}"].write_bytes(render_jpeg(96, index % 2 == 0, (7, index)))
    images["broken"] = tmp_path / "in" / "broken.jpg"
    images["broken"].write_bytes(b"not a jpeg")
    assert explain_images(predictor, images, tmp_path / "out", batch_size=2) == 3
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["eye0.png", "eye1.png", "eye2.png"]
    readable = {key: path for key, path in images.items() if key != "broken"}
    scored = predictor.score_images(readable)
    tensors = torch.stack([predictor.decoder()({"jpg": jpeg}, 0)
                           for _key, jpeg in map(_raw_sample(predictor), sorted(readable.items()))])
    with torch.no_grad():
        ours = torch.sigmoid(predictor.model(tensors)).tolist()
    assert ours == pytest.approx(scored.scores, abs=1e-6), "the overlays' inputs are the inputs the scores came from"


def test_explain_shards_names_overlays_by_sample_key(tmp_path):
    from dist_train.evaluation.explain_predict import explain_shards

    from conftest import write_shards

    predictor = hand_made_export(tmp_path)
    urls = [str(path) for path in write_shards(tmp_path / "shards", "val", [3, 2], corrupt={"val-01-0001"})]
    assert explain_shards(predictor, urls, tmp_path / "out", batch_size=4) == 4
    assert sorted(path.stem for path in (tmp_path / "out").iterdir()) == [
        "val-00-0000", "val-00-0001", "val-00-0002", "val-01-0000"]


# ---------------------------------------------------------------- attention rollout (ViTs)


def _hand_attention(backbone: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Each block's softmax(q k^T / sqrt(d)), recomputed from its qkv weights on the block's own input."""
    x = backbone.norm_pre(backbone._pos_embed(backbone.patch_embed(images)))
    found = []
    for block in backbone.blocks:
        attn = block.attn
        qkv = attn.qkv(block.norm1(x)).reshape(x.shape[0], x.shape[1], 3, attn.num_heads, attn.head_dim)
        q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        found.append(((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1))
        x = block(x)
    return found


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_vit_rollout_is_the_product_of_the_blocks_residual_attention(pool):
    """The Abnar & Zuidema rule by hand: prod over blocks of norm((mean_heads A + I) / 2), the pooled row."""
    cfg = ModelConfig(backbone="vit_tiny_patch16_224", global_pool=pool, head_widths=[8], head_dropout=[0.0])
    model = build_model(cfg, image_size=64).eval()
    images = nn.functional.interpolate(noise_batch(2), size=64)
    backbone = model.backbone
    with torch.no_grad():
        rollout = torch.eye(backbone.patch_embed.num_patches + backbone.num_prefix_tokens)
        for attention in _hand_attention(backbone, images):
            mixed = 0.5 * attention.mean(dim=1) + 0.5 * torch.eye(attention.shape[-1])
            rollout = (mixed / mixed.sum(-1, keepdim=True)) @ rollout
    prefix = backbone.num_prefix_tokens
    row = rollout[:, prefix:].mean(1) if pool == "avg" else rollout[:, 0]
    assert torch.allclose(rollout_grid(model, images), row[:, prefix:].reshape(2, 4, 4), atol=1e-6)
    maps = cam_maps(model, images)
    assert maps.shape == (2, 64, 64) and maps.min() == 0 and maps.max() == 1


def test_rollout_leaves_the_vit_as_it_found_it():
    model = tiny("test_vit").train()
    fused = [block.attn.fused_attn for block in model.backbone.blocks]
    cam_maps(model, nn.functional.interpolate(noise_batch(1), size=64))
    assert model.training and [block.attn.fused_attn for block in model.backbone.blocks] == fused
    with pytest.raises(ValueError, match="rollout needs a ViT"):
        cam_maps(tiny("resnet10t"), noise_batch(1), method="rollout")
