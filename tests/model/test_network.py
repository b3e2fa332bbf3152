"""dist_train/model/network.py: head, pretrained weights (files, cache, refusals), decay groups, export loading."""

from __future__ import annotations

import json
import math
from pathlib import Path

import huggingface_hub
import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from dist_train.config import ModelConfig, load_config
from dist_train.config.schema import ConfigError
from dist_train.errors import UserError
from dist_train.model.network import (
    build_head,
    build_model,
    export_meta_path,
    load_for_inference,
    prepare_model,
)

from run_helpers import REPO

BACKBONE = "test_efficientnet"


def tiny_cfg(**overrides) -> ModelConfig:
    return ModelConfig(**{"backbone": BACKBONE, "head_widths": [16, 8], "head_dropout": [0.1, 0.1], **overrides})


def timm_weights(name: str = BACKBONE, num_classes: int = 1000) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {key: value.contiguous() for key, value in
            timm.create_model(name, num_classes=num_classes).state_dict().items()}


def assert_backbone_equals(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, weights[key]), key


# ---------------------------------------------------------------- head and forward


def test_forward_gives_one_logit_per_image():
    model = build_model(tiny_cfg())
    assert model(torch.randn(3, 3, 32, 32)).shape == (3,)
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1,)
    assert set(model.data_config) == {"mean", "std"} and len(model.data_config["mean"]) == 3


def test_head_layout_follows_config():
    head = build_head(32, ModelConfig(head_widths=[16, 8], head_dropout=[0.3, 0.2, 0.5]))
    kinds = [type(module).__name__ for module in head]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Dropout", "Linear", "BatchNorm1d", "ReLU", "Dropout",
                     "Dropout", "Float32Linear"]
    assert [m.p for m in head if isinstance(m, nn.Dropout)] == [0.3, 0.2, 0.5]
    plain = build_head(32, ModelConfig(head_widths=[16], head_dropout=[0.0], head_batchnorm=False))
    assert [type(module).__name__ for module in plain] == ["Linear", "ReLU", "Dropout", "Float32Linear"]


def test_head_init_statistics():
    torch.manual_seed(0)
    head = build_head(2048, ModelConfig(head_widths=[1024], head_dropout=[0.0]))
    hidden, output = [module for module in head if isinstance(module, nn.Linear)]
    assert hidden.weight.std().item() == pytest.approx(math.sqrt(2 / 2048), rel=0.03)  # He normal, fan_in
    assert abs(hidden.weight.mean().item()) < 1e-3
    bound = math.sqrt(6 / (1024 + 1))  # Glorot uniform
    assert output.weight.abs().max().item() <= bound
    assert output.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
    assert not hidden.bias.any() and not output.bias.any()


# ---------------------------------------------------------------- names and pretrained weights


def test_unknown_backbone_names_option_and_suggests():
    with pytest.raises(ValueError, match="model.backbone") as error:
        build_model(ModelConfig(backbone="efficentnet_b0"))
    assert "efficientnet_b0" in str(error.value)


def test_missing_pretrained_file(tmp_path):
    missing = tmp_path / "nowhere.safetensors"
    with pytest.raises(ValueError, match="model.pretrained") as error:
        build_model(tiny_cfg(pretrained=str(missing)))
    assert str(missing) in str(error.value)


@pytest.mark.parametrize("pretrained_id", ["test_efficientnet.r160_in1k", "timm/test_efficientnet.r160_in1k"])
def test_uncached_id_is_an_error_not_a_random_init(tmp_path, monkeypatch, pretrained_id):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="model.pretrained") as error:
        build_model(tiny_cfg(pretrained=pretrained_id))
    assert pretrained_id in str(error.value) and "cache" in str(error.value)


def test_unknown_pretrained_value():
    with pytest.raises(ValueError, match="model.pretrained.*'imagenet'"):
        build_model(tiny_cfg(pretrained="imagenet"))


@pytest.mark.parametrize("pretrained_id", ["test_efficientnet.r160_in1k", "hf-hub:timm/test_efficientnet.r160_in1k"])
def test_cached_id_loads_from_local_cache(tmp_path, monkeypatch, pretrained_id):
    repo = tmp_path / "models--timm--test_efficientnet.r160_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    weights = timm_weights()
    save_file(weights, str(repo / "snapshots" / "abc123" / "model.safetensors"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert_backbone_equals(build_model(tiny_cfg(pretrained=pretrained_id)), weights)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_backbone_only_file_loads_and_drops_timm_classifier(tmp_path, suffix):
    weights = timm_weights()
    path = tmp_path / f"backbone{suffix}"
    save_file(weights, str(path)) if suffix == ".safetensors" else torch.save(weights, path)
    assert_backbone_equals(build_model(tiny_cfg(pretrained=str(path))), weights)


def test_backbone_file_of_another_architecture_names_the_keys(tmp_path):
    path = tmp_path / "resnet.safetensors"
    save_file(timm_weights("test_resnet", num_classes=0), str(path))
    with pytest.raises(ValueError, match="missing keys conv_stem.weight.*unexpected keys conv1"):
        build_model(tiny_cfg(pretrained=str(path)))


class _CreatesMarker:
    """Unpickling this runs open(marker, 'w'): code execution hidden in a weight file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_pickled_code_is_refused_and_never_runs(tmp_path):
    marker, proof = tmp_path / "pwned", tmp_path / "pwned_proof"
    path = tmp_path / "evil.pth"
    torch.save({"conv_stem.weight": _CreatesMarker(marker)}, path)
    with pytest.raises(ValueError, match="model.pretrained") as error:
        build_model(tiny_cfg(pretrained=str(path)))
    assert str(path) in str(error.value)
    assert not marker.exists()
    torch.save({"payload": _CreatesMarker(proof)}, tmp_path / "proof.pth")
    torch.load(tmp_path / "proof.pth", weights_only=False)  # the same payload is live when unpickled unsafely
    assert proof.exists()


# ---------------------------------------------------------------- decay groups, placement, export


def test_no_decay_group_holds_biases_and_norms_frozen_or_not():
    from dist_train.config import OptimConfig, UnfreezeConfig
    from dist_train.model.optim import optimizer_param_groups
    from dist_train.model.unfreeze import UnfreezeSchedule

    model = build_model(tiny_cfg())
    for param in model.backbone.parameters():
        param.requires_grad_(False)
    groups = optimizer_param_groups(model, UnfreezeSchedule(UnfreezeConfig(), model), OptimConfig(weight_decay=0.05))
    decay = [p for group in groups if group["decay"] for p in group["params"]]
    no_decay = [p for group in groups if not group["decay"] for p in group["params"]]
    assert {g["weight_decay"] for g in groups if g["decay"]} == {0.05}
    assert {g["weight_decay"] for g in groups if not g["decay"]} == {0.0}
    assert len(decay) + len(no_decay) == len(list(model.parameters()))
    assert all(param.ndim > 1 for param in decay)
    assert all(param.ndim <= 1 for param in no_decay)
    assert any(param is model.backbone.bn1.weight for param in no_decay)


def test_prepare_model_channels_last():
    model = prepare_model(build_model(tiny_cfg(channels_last=True)), tiny_cfg(channels_last=True), "cpu")
    assert model.backbone.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)


def test_load_for_inference_roundtrip(tmp_path):
    cfg = tiny_cfg(head_dropout=[0.1, 0.1, 0.2])
    model = build_model(cfg).eval()
    weights = tmp_path / "model.safetensors"
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, str(weights))
    meta = {"model": {**cfg.__dict__, "pretrained": str(tmp_path / "gone.safetensors")},
            "preprocess": {"image_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3}, "threshold": 0.3}
    assert export_meta_path(weights) == tmp_path / "model.json"
    export_meta_path(weights).write_text(json.dumps(meta))
    loaded, loaded_meta = load_for_inference(weights)
    images = torch.randn(2, 3, 32, 32)
    assert not loaded.training
    assert torch.equal(loaded(images), model(images))
    assert loaded_meta["threshold"] == 0.3 and loaded_meta["preprocess"]["image_size"] == 32


def test_full_model_file_loads_head_too(tmp_path):
    source = build_model(tiny_cfg())
    path = tmp_path / "run.safetensors"
    save_file({key: value.contiguous() for key, value in source.state_dict().items()}, str(path))
    model = build_model(tiny_cfg(pretrained=str(path)))
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


# ---------------------------------------------------------------- logits under mixed precision


def test_logit_layer_computes_in_float32_under_bf16_autocast():
    """bf16 logits have 8 significant bits: 20,000 scores collapse to a few hundred values, moving beta and the
    threshold. Oracles, on the very inputs the last layer received under autocast: a plain torch nn.Linear with
    the same weights run outside autocast in float32 (the distinct-score count must equal its count), and the
    layer evaluated by hand in float64 (the logits must agree with it to float32 precision)."""
    torch.manual_seed(0)
    head = build_head(64, ModelConfig(head_widths=[32], head_dropout=[0.0])).eval()
    received = []
    head[-1].register_forward_hook(lambda module, args, output: received.append(args[0].detach()))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(torch.randn(20_000, 64)).squeeze(-1)
    last = head[-1]
    plain = nn.Linear(last.in_features, 1)
    plain.load_state_dict(last.state_dict())
    with torch.no_grad():
        float32_reference = plain(received[0].float()).squeeze(-1)
    float64_reference = (received[0].double() @ last.weight.double().T + last.bias.double()).squeeze(-1)
    assert logits.dtype == torch.float32
    assert logits.unique().numel() == float32_reference.unique().numel() > 19_900
    torch.testing.assert_close(logits.double(), float64_reference, rtol=1e-5, atol=1e-5)


def test_whole_model_gives_float32_logits_under_bf16_autocast():
    model = build_model(tiny_cfg()).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(torch.randn(2, 3, 32, 32)).dtype == torch.float32


def test_head_state_dict_keys_match_a_plain_torch_head():
    """Checkpoints and exports written with plain nn.Linear heads must still load strictly."""
    plain = nn.Sequential(nn.Linear(32, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 1))
    head = build_head(32, ModelConfig(head_widths=[16], head_dropout=[0.1]))
    assert list(head.state_dict()) == list(plain.state_dict())
    head.load_state_dict(plain.state_dict(), strict=True)
    torch.testing.assert_close(head.eval()(torch.ones(2, 32)), plain.eval()(torch.ones(2, 32)))


# ---------------------------------------------------------------- image size, stochastic depth, package value


def test_a_vit_is_built_at_the_run_image_size_and_a_cnn_ignores_it():
    vit = build_model(tiny_cfg(backbone="test_vit"), image_size=48)
    assert vit.backbone.pos_embed.shape == (1, 1 + (48 // 16) ** 2, 64)
    assert vit(torch.randn(2, 3, 48, 48)).shape == (2,)
    cnn = build_model(tiny_cfg(), image_size=48)
    assert cnn(torch.randn(2, 3, 48, 48)).shape == (2,)


def test_load_for_inference_builds_a_vit_at_the_exports_image_size(tmp_path):
    cfg = tiny_cfg(backbone="test_vit")
    model = build_model(cfg, image_size=48).eval()
    weights = tmp_path / "model.safetensors"
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, str(weights))
    export_meta_path(weights).write_text(json.dumps(
        {"model": cfg.__dict__, "preprocess": {"image_size": 48, "mean": [0.5] * 3, "std": [0.5] * 3}}))
    loaded, _ = load_for_inference(weights)
    images = torch.randn(2, 3, 48, 48)
    assert torch.equal(loaded(images), model(images))


def test_drop_path_rate_reaches_timms_stochastic_depth():
    """timm's rule: the rate grows linearly over the blocks, 0 at the first, the configured rate at the last."""
    blocks = build_model(tiny_cfg(backbone="test_vit", drop_path_rate=0.2), image_size=32).backbone.blocks
    rates = [block.drop_path1.drop_prob if hasattr(block.drop_path1, "drop_prob") else 0.0 for block in blocks]
    assert rates == pytest.approx([0.2 * index / (len(blocks) - 1) for index in range(len(blocks))])
    assert all(isinstance(block.drop_path1, nn.Identity) for block in build_model(tiny_cfg(backbone="test_vit"),
                                                                                   image_size=32).backbone.blocks)


@pytest.mark.parametrize("overrides, message", [
    (["model.drop_path_rate=1.0"], r"model.drop_path_rate: 1.0 is outside \[0.0, 1.0\)"),
    (["model.pretrained=package:efficientnet-lite0", "model.backbone=resnet18"],
     "package:efficientnet-lite0 needs model.backbone tf_efficientnet_lite0, not 'resnet18'"),
])
def test_model_config_refuses_bad_values_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(str(REPO / "configs" / "test_tiny.yaml"), overrides)


def test_global_pool_avg_gives_a_vit_the_mean_of_its_patch_tokens_through_fc_norm():
    """RETFound's pooling, computed by hand from the ViT's token features."""
    cfg = ModelConfig(backbone="vit_tiny_patch16_224", global_pool="avg", head_widths=[], head_dropout=[])
    backbone = build_model(cfg, image_size=32).backbone.eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = backbone.forward_features(images)
        expected = backbone.fc_norm(tokens[:, backbone.num_prefix_tokens:].mean(dim=1))
        assert torch.allclose(backbone(images), expected, atol=1e-6)


def test_a_pooling_the_backbone_does_not_offer_is_one_line():
    with pytest.raises(UserError, match=r"^model.global_pool: 'token' is not a pooling .*resnet10t"):
        build_model(ModelConfig(backbone="resnet10t", global_pool="token", head_widths=[8], head_dropout=[0.0]))
