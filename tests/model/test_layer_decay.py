"""optim.layer_decay: timm's layer numbering, our head on top, composed with phases, warmup, cosine and resume.

Oracles: the MAE/RETFound rule hand-computed from parameter names (block i of a depth-D ViT at
layer_decay ** (D - i), the embeddings at ** (D + 1), the head at 1), and timm's own
`param_groups_layer_decay` run on the same architecture with its own classifier in place of our head.
"""

from __future__ import annotations

import math
import re

import pytest
import timm
import torch
from timm.optim import param_groups_layer_decay
from torch import nn

from dist_train.config import ModelConfig, OptimConfig, PhaseConfig, ScheduleConfig, UnfreezeConfig
from dist_train.model.network import build_model
from dist_train.model.optim import (
    LayerDecayError,
    LRSchedule,
    build_optimizer,
    check_layer_decay,
    optimizer_param_groups,
)
from dist_train.model.unfreeze import UnfreezeSchedule

DECAY = 0.65
LR = 1e-3


def tiny(backbone: str) -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(backbone=backbone, head_widths=[8], head_dropout=[0.0]))


def schedule_of(model: nn.Module, *phases: PhaseConfig) -> UnfreezeSchedule:
    return UnfreezeSchedule(UnfreezeConfig(list(phases) or [PhaseConfig(train="all")]), model)


def lr_by_name(model: nn.Module, groups: list[dict]) -> dict[str, float]:
    """Each parameter's LR in `groups` (optimizer param groups), by the model's parameter names."""
    group_lr = {id(param): group["lr"] for group in groups for param in group["params"]}
    return {name: group_lr[id(param)] for name, param in model.named_parameters()}


def mae_scale(name: str, depth: int) -> float:
    """MAE's `param_groups_lrd` (RETFound fine-tuning), from the name alone: num_layers = depth + 1."""
    block = re.match(r"backbone\.blocks\.(\d+)\.", name)
    if block:
        return DECAY ** (depth - int(block.group(1)))
    if re.match(r"backbone\.(cls_token|reg_token|pos_embed|patch_embed)", name):
        return DECAY ** (depth + 1)
    return 1.0  # fc_norm and the head


def test_vit_block_lrs_follow_the_mae_rule_hand_computed():
    """test_vit2: depth 8, avg pooling with fc_norm, as RETFound fine-tunes vit_large_patch16."""
    model = tiny("test_vit2")
    optim_cfg = OptimConfig(lr=LR, layer_decay=DECAY)
    lrs = lr_by_name(model, optimizer_param_groups(model, schedule_of(model), optim_cfg))
    assert len(model.backbone.blocks) == 8
    for name, lr in lrs.items():
        assert lr == pytest.approx(LR * mae_scale(name, 8), rel=1e-12), name
    assert lrs["backbone.blocks.7.mlp.fc1.weight"] == pytest.approx(LR * 0.65)
    assert lrs["backbone.blocks.0.attn.qkv.weight"] == pytest.approx(LR * 0.65 ** 8)
    assert lrs["backbone.pos_embed"] == pytest.approx(LR * 0.65 ** 9)


@pytest.mark.parametrize("backbone", ["test_vit", "test_vit2", "test_efficientnet", "resnet10t"])
def test_scales_equal_timms_own_layer_decay_with_its_classifier(backbone):
    """Our head takes the place of timm's classifier: every backbone parameter gets timm's lr_scale."""
    model = tiny(backbone)
    groups = optimizer_param_groups(model, schedule_of(model), OptimConfig(lr=LR, layer_decay=DECAY))
    ours = {name: lr / LR for name, lr in lr_by_name(model, groups).items()}
    reference = timm.create_model(backbone, num_classes=1)
    names = {id(param): name for name, param in reference.named_parameters()}
    timm_scale = {names[id(param)]: group["lr_scale"]
                  for group in param_groups_layer_decay(reference, layer_decay=DECAY) for param in group["params"]}
    classifier = reference.pretrained_cfg["classifier"]
    assert {name: ours[f"backbone.{name}"] for name in timm_scale if not name.startswith(classifier)} == \
        pytest.approx({name: scale for name, scale in timm_scale.items() if not name.startswith(classifier)})
    assert {ours[name] for name in ours if name.startswith("head.")} == {timm_scale[f"{classifier}.weight"]} == {1.0}


def test_cnn_layers_are_timms_fine_groups_from_the_head_down():
    """The decision for CNNs: decay applies, per timm's fine groups (stem, each block), as timm does it."""
    model = tiny("resnet10t")
    lrs = lr_by_name(model, optimizer_param_groups(model, schedule_of(model), OptimConfig(lr=LR, layer_decay=0.5)))
    # resnet10t: stem, layer1.0 ... layer4.0 (one block per stage), then our head
    assert lrs["backbone.layer4.0.conv1.weight"] == pytest.approx(LR * 0.5)
    assert lrs["backbone.layer1.0.conv1.weight"] == pytest.approx(LR * 0.5 ** 4)
    assert lrs["backbone.conv1.0.weight"] == pytest.approx(LR * 0.5 ** 5)
    assert lrs["head.0.weight"] == LR


def test_backbone_without_a_group_matcher_is_refused_in_one_line():
    model = tiny("pit_ti_224")
    assert not hasattr(model.backbone, "group_matcher")
    with pytest.raises(LayerDecayError, match=r"^optim.layer_decay: .* no timm group_matcher.*layer_decay=null$"):
        optimizer_param_groups(model, schedule_of(model), OptimConfig(layer_decay=DECAY))
    with pytest.raises(LayerDecayError, match="no timm group_matcher"):
        check_layer_decay("pit_ti_224", DECAY)
    check_layer_decay("pit_ti_224", None)
    check_layer_decay("vit_large_patch16_224", DECAY)  # built on the meta device: no memory, no time


def test_without_layer_decay_the_groups_are_the_phase_groups_of_before():
    model = tiny("test_vit2")
    schedule = schedule_of(model, PhaseConfig(0, "head"), PhaseConfig(1, "all"))
    groups = optimizer_param_groups(model, schedule, OptimConfig(lr=LR))
    assert [(group["phase"], group["decay"]) for group in groups] == [(0, True), (0, False), (1, True), (1, False)]
    assert {group["lr_scale"] for group in groups} == {1.0}


# ---------------------------------------------------------------- composition with phases and the schedule


def phased_run(layer_decay: float | None, lr_scaling_factor: float = 1.0):
    """test_vit2 with a head phase (epoch 0) then last_2_blocks at its own LR (epoch 1, warmup 1 epoch),
    a cosine over 4 epochs of 10 steps."""
    model = tiny("test_vit2")
    phases = [PhaseConfig(0, "head"), PhaseConfig(1, "last_2_blocks", lr=1e-4, warmup_epochs=1.0)]
    schedule = schedule_of(model, *phases)
    optimizer = build_optimizer(model, schedule, OptimConfig(lr=LR, layer_decay=layer_decay), lr_scaling_factor)
    lr_schedule = LRSchedule(optimizer, ScheduleConfig(kind="cosine", min_lr=1e-6), phases, 10, 4,
                             batch_scale=lr_scaling_factor)
    return model, optimizer, lr_schedule


def cosine(peak: float, floor: float, step: int, start: int, total: int) -> float:
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * (step - start) / (total - start)))


@pytest.mark.parametrize("batch_scale", [1.0, 2.0])
def test_layer_scale_multiplies_warmup_cosine_and_batch_scaling(batch_scale):
    model, optimizer, lr_schedule = phased_run(DECAY, batch_scale)
    lr_schedule.step(10, 1)  # phase 1 starts
    lr_schedule.step(15, 1)  # its 6th of 10 warmup steps; its cosine restarts after the warmup (step 20)
    lrs = lr_by_name(model, optimizer.param_groups)
    warmup = (5 + 1) / 10
    head_peak, block_peak = LR * batch_scale, 1e-4 * batch_scale
    assert lrs["head.0.weight"] == pytest.approx(head_peak)  # cosine not begun: reset at phase 1, after its warmup
    assert lrs["backbone.blocks.7.attn.qkv.weight"] == pytest.approx(block_peak * warmup * DECAY)
    assert lrs["backbone.blocks.6.attn.qkv.weight"] == pytest.approx(block_peak * warmup * DECAY ** 2)
    assert lrs["backbone.fc_norm.weight"] == pytest.approx(block_peak * warmup)
    assert lrs["backbone.blocks.5.attn.qkv.weight"] == 0.0  # never trained: lr 0
    lr_schedule.step(40, 4)  # the run's last step: every group at min_lr times its layer scale (as timm, MAE)
    lrs = lr_by_name(model, optimizer.param_groups)
    assert lrs["backbone.blocks.6.attn.qkv.weight"] == pytest.approx(1e-6 * DECAY ** 2)
    lr_schedule.step(30, 3)
    expected = cosine(block_peak, 1e-6, 30, 20, 40) * DECAY
    assert lr_by_name(model, optimizer.param_groups)["backbone.blocks.7.mlp.fc2.weight"] == pytest.approx(expected)


def test_groups_are_phase_decay_layer_and_reload_in_the_same_order():
    """A checkpoint loads optimizer state by group order: a fresh build must line up with the saved one."""
    model, optimizer, lr_schedule = phased_run(DECAY)
    keys = [(group["phase"], group["decay"], group["layer"]) for group in optimizer.param_groups]
    assert len(keys) == len(set(keys)) and keys[0] == (0, True, 9)
    _train(model, optimizer, lr_schedule)
    saved = optimizer.state_dict()
    again, rebuilt, _ = phased_run(DECAY)
    rebuilt.load_state_dict(saved)
    old_state = {name: optimizer.state[param] for name, param in model.named_parameters() if param in optimizer.state}
    new_params = dict(again.named_parameters())
    assert old_state
    for name, state in old_state.items():
        assert torch.equal(rebuilt.state[new_params[name]]["exp_avg"], state["exp_avg"]), name


def test_a_resume_under_another_layer_decay_applies_its_own_scales():
    """The optimizer state restores the saved run's groups, lr_scale included; the schedule keeps the run's."""
    _, saved_optimizer, _ = phased_run(DECAY)
    model, optimizer, lr_schedule = phased_run(0.5)
    optimizer.load_state_dict(saved_optimizer.state_dict())
    lr_schedule.step(0, 0)
    lr_schedule.step(10, 1)
    lr_schedule.step(15, 1)
    lrs = lr_by_name(model, optimizer.param_groups)
    assert lrs["backbone.blocks.6.attn.qkv.weight"] == pytest.approx(1e-4 * 0.6 * 0.5 ** 2)


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, lr_schedule: LRSchedule) -> None:
    generator = torch.Generator().manual_seed(0)
    for step in (10, 11):
        lr_schedule.step(step, 1)
        optimizer.zero_grad()
        images = torch.randn(2, 3, 160, 160, generator=generator)
        nn.functional.binary_cross_entropy_with_logits(model(images), torch.tensor([0.0, 1.0])).backward()
        optimizer.step()
