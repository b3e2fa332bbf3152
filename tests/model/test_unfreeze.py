"""dist_train/model/unfreeze.py: layer/block specs, gating by requires_grad, optimizer groups, LR schedule."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from dist_train.config import ModelConfig, OptimConfig, PhaseConfig, ScheduleConfig, UnfreezeConfig
from dist_train.model.network import build_model
from dist_train.model.optim import (
    LRSchedule,
    build_optimizer,
    global_batch_size,
    lr_scale,
    lr_scaling_warning,
    optimizer_param_groups,
    phase_peak_lrs,
)
from dist_train.model.unfreeze import NEVER, UnfreezeSchedule, blocks, trainable_names


def tiny_model(backbone: str = "test_efficientnet") -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(backbone=backbone, head_widths=[8], head_dropout=[0.0]))


def unfreeze_cfg(*phases: tuple[int, str], frozen_bn_eval: bool = True, **phase_kwargs) -> UnfreezeConfig:
    return UnfreezeConfig([PhaseConfig(from_epoch=start, train=train, **phase_kwargs) for start, train in phases],
                          frozen_bn_eval=frozen_bn_eval)


def ids(model: nn.Module, names: set[str]) -> set[int]:
    by_name = dict(model.named_parameters())
    return {id(by_name[name]) for name in names}


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, count: int) -> None:
    generator = torch.Generator().manual_seed(count)
    for _ in range(count):
        images = torch.randn(4, 3, 32, 32, generator=generator)
        targets = torch.tensor([0.0, 1.0, 0.0, 1.0])
        optimizer.zero_grad()
        nn.functional.binary_cross_entropy_with_logits(model(images), targets).backward()
        optimizer.step()


# ---------------------------------------------------------------- specs


def test_last_50_layers_matches_an_independent_walk():
    model = tiny_model("efficientnet_b0")
    owners = [module for module in model.backbone.modules() if any(True for _ in module.parameters(recurse=False))]
    expected = {id(param) for module in owners[-50:] for param in module.parameters(recurse=False)}
    expected |= {id(param) for param in model.head.parameters()}
    chosen = trainable_names(model, "last_50_layers")
    assert ids(model, chosen) == expected
    assert len(owners) == 130 and len(chosen) == len(expected)


@pytest.mark.parametrize("backbone", ["test_efficientnet", "test_vit"])
def test_head_all_and_oversized_specs(backbone):
    model = tiny_model(backbone)
    head = {id(param) for param in model.head.parameters()}
    everything = {id(param) for param in model.parameters()}
    assert ids(model, trainable_names(model, "head")) == head
    assert ids(model, trainable_names(model, "all")) == everything
    assert ids(model, trainable_names(model, "last_9999_layers")) == everything
    assert ids(model, trainable_names(model, "last_9999_blocks")) == everything
    with pytest.raises(ValueError, match="train spec"):
        trainable_names(model, "last_two_layers")


def test_blocks_are_timm_coarse_groups_then_the_head():
    model = tiny_model("efficientnet_b0")
    groups = blocks(model)
    assert len(groups) == 9 and all(name.startswith("head.") for name in groups[-1])
    last_one = trainable_names(model, "last_1_blocks")
    backbone_part = {name for name in last_one if name.startswith("backbone.")}
    expected = {name for name, _ in model.named_parameters()
                if name.startswith(("backbone.blocks.6.", "backbone.conv_head.", "backbone.bn2."))}
    assert backbone_part == expected
    last_two = trainable_names(model, "last_2_blocks")
    assert {name for name in last_two - last_one} == {name for name, _ in model.named_parameters()
                                                      if name.startswith("backbone.blocks.5.")}


def test_wrapped_models_use_the_inner_names():
    model = tiny_model()
    compiled = torch.compile(model)  # wrapping is lazy: nothing compiles without a forward
    assert trainable_names(compiled, "head") == trainable_names(model, "head")
    assert all(name.startswith("head.") for name in trainable_names(compiled, "head"))


# ---------------------------------------------------------------- phases and gating


def test_phase_index_and_apply_info():
    model = tiny_model()
    schedule = UnfreezeSchedule(unfreeze_cfg((0, "head"), (2, "last_3_blocks"), (4, "all")), model)
    assert [schedule.phase_index_at(epoch) for epoch in range(6)] == [0, 0, 1, 1, 2, 2]
    info = schedule.apply(model, 0)
    head_size = sum(param.numel() for param in model.head.parameters())
    assert info == {"phase": 0, "train": "head", "trainable_params": head_size, "from_epoch": 0}
    assert all(param.requires_grad for param in model.head.parameters())
    assert not any(param.requires_grad for param in model.backbone.parameters())
    assert schedule.apply(model, 2)["trainable_params"] == sum(param.numel() for param in model.parameters())


@pytest.mark.parametrize("optimizer_name", ["adamw", "sgd"])
def test_frozen_parameters_bitwise_unchanged_until_their_phase(optimizer_name):
    model = tiny_model()
    schedule = UnfreezeSchedule(unfreeze_cfg((0, "head"), (1, "all")), model)
    optimizer = build_optimizer(model, schedule, OptimConfig(name=optimizer_name, lr=1e-2, weight_decay=0.1,
                                                             momentum=0.9))
    schedule.apply(model, 0)
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    train_steps(model, optimizer, 3)
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]) != name.startswith("head."), name
        assert (param in optimizer.state) == name.startswith("head."), name
    schedule.apply(model, 1)
    train_steps(model, optimizer, 1)
    assert not torch.equal(model.backbone.conv_stem.weight, before["backbone.conv_stem.weight"])


def test_state_of_a_newly_unfrozen_parameter_starts_at_zero():
    model = tiny_model()
    schedule = UnfreezeSchedule(unfreeze_cfg((0, "head"), (1, "all")), model)
    beta1 = 0.8
    optimizer = build_optimizer(model, schedule, OptimConfig(lr=1e-3, weight_decay=0.05, betas=[beta1, 0.99]))
    schedule.apply(model, 0)
    train_steps(model, optimizer, 2)
    weight = model.backbone.conv_stem.weight
    assert weight not in optimizer.state
    schedule.apply(model, 1)
    optimizer.zero_grad()
    nn.functional.binary_cross_entropy_with_logits(model(torch.randn(4, 3, 32, 32)), torch.ones(4)).backward()
    first_grad = weight.grad.clone()
    optimizer.step()
    state = optimizer.state[weight]
    assert state["step"].item() == 1
    torch.testing.assert_close(state["exp_avg"], (1 - beta1) * first_grad, rtol=1e-6, atol=0)


@pytest.mark.parametrize("frozen_bn_eval", [True, False])
def test_frozen_batchnorm_statistics_untouched_in_training_mode(frozen_bn_eval):
    model = tiny_model()
    schedule = UnfreezeSchedule(unfreeze_cfg((0, "head"), frozen_bn_eval=frozen_bn_eval), model)
    schedule.apply(model, 0)
    norms = {name: module for name, module in model.named_modules() if isinstance(module, nn.BatchNorm2d)}
    before = {name: {key: value.clone() for key, value in module.state_dict().items()}
              for name, module in norms.items()}
    head_mean = model.head[1].running_mean.clone()
    schedule.set_train_mode(model)
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32))
    assert model.training and model.head[1].training
    assert not torch.equal(model.head[1].running_mean, head_mean)
    for name, module in norms.items():
        unchanged = all(torch.equal(value, before[name][key]) for key, value in module.state_dict().items())
        assert unchanged == frozen_bn_eval and module.training != frozen_bn_eval, name


# ---------------------------------------------------------------- optimizer groups


def test_groups_by_first_trainable_phase():
    model = tiny_model()
    phases = [PhaseConfig(0, "head", lr=1e-3), PhaseConfig(1, "last_2_blocks"), PhaseConfig(2, "last_2_blocks")]
    schedule = UnfreezeSchedule(UnfreezeConfig(phases), model)
    groups = optimizer_param_groups(model, schedule, OptimConfig(lr=1e-4, weight_decay=0.05))
    assert [(group["phase"], group["decay"]) for group in groups] == \
        [(0, True), (0, False), (1, True), (1, False), (NEVER, True), (NEVER, False)]
    assert [group["lr"] for group in groups] == [1e-3, 1e-3, 1e-4, 1e-4, 0.0, 0.0]
    assert [group["weight_decay"] for group in groups] == [0.05, 0.0] * 3
    grouped = [id(param) for group in groups for param in group["params"]]
    assert sorted(grouped) == sorted(id(param) for param in model.parameters())
    assert all(param.ndim <= 1 for group in groups if not group["decay"] for param in group["params"])


# ---------------------------------------------------------------- LR schedule


def lr_setup(kind: str, phases: list[PhaseConfig], warmup_epochs: float = 0.0, steps_per_epoch: int = 10,
             epochs: int = 3, **schedule_kwargs) -> tuple[torch.optim.Optimizer, LRSchedule]:
    """An SGD whose groups carry the phase keys optimizer_param_groups gives (one group per phase)."""
    groups = [{"params": [nn.Parameter(torch.zeros(1))], "phase": index,
               "base_lr": phase.lr if phase.lr is not None else 1.0, "lr": 0.0}
              for index, phase in enumerate(phases)]
    groups.append({"params": [nn.Parameter(torch.zeros(1))], "phase": NEVER, "base_lr": 0.0, "lr": 0.0})
    optimizer = torch.optim.SGD(groups, lr=1.0)
    cfg = ScheduleConfig(kind=kind, warmup_epochs=warmup_epochs, **schedule_kwargs)
    return optimizer, LRSchedule(optimizer, cfg, phases, steps_per_epoch, epochs)


def lrs_at(optimizer: torch.optim.Optimizer, schedule: LRSchedule, step: int, steps_per_epoch: int = 10) -> list:
    schedule.step(step, step // steps_per_epoch)
    return [group["lr"] for group in optimizer.param_groups]


def test_linear_warmup_then_constant():
    optimizer, schedule = lr_setup("constant", [PhaseConfig(0, "all", lr=0.5)], warmup_epochs=0.5)
    assert [lrs_at(optimizer, schedule, step)[0] for step in range(7)] == \
        pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.5, 0.5])
    assert lrs_at(optimizer, schedule, 3)[-1] == 0.0


def test_cosine_after_warmup_to_min_lr():
    optimizer, schedule = lr_setup("cosine", [PhaseConfig(0, "all", lr=1.0)], warmup_epochs=0.2, min_lr=0.1)
    assert lrs_at(optimizer, schedule, 0)[0] == pytest.approx(0.5)  # warmup of 2 steps
    assert lrs_at(optimizer, schedule, 2)[0] == pytest.approx(1.0)  # cosine starts after warmup
    assert lrs_at(optimizer, schedule, 16)[0] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 14 / 28)))
    assert lrs_at(optimizer, schedule, 23)[0] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 21 / 28)))
    assert lrs_at(optimizer, schedule, 30)[0] == pytest.approx(0.1)


def test_plateau_reduces_after_patience_and_floors():
    optimizer, schedule = lr_setup("plateau", [PhaseConfig(0, "all", lr=1.0)], plateau_factor=0.5,
                                   plateau_patience=2, min_lr=0.2)
    for metric in (0.5, 0.6, 0.6):
        schedule.on_eval(metric)
    assert lrs_at(optimizer, schedule, 0)[0] == 1.0  # one evaluation without improvement
    schedule.on_eval(0.55)
    assert lrs_at(optimizer, schedule, 1)[0] == 0.5
    schedule.on_eval(0.7)
    schedule.on_eval(float("nan"))
    schedule.on_eval(0.69)
    assert lrs_at(optimizer, schedule, 2)[0] == 0.25
    for _ in range(4):
        schedule.on_eval(0.0)
    assert lrs_at(optimizer, schedule, 3)[0] == 0.2


def test_later_phase_groups_wait_then_warm_up_and_reset_the_plateau():
    phases = [PhaseConfig(0, "head", lr=1e-3), PhaseConfig(1, "all", lr=1e-4, warmup_epochs=0.2)]
    optimizer, schedule = lr_setup("plateau", phases, plateau_patience=0, plateau_factor=0.5)
    schedule.on_eval(0.5)
    schedule.on_eval(0.4)
    assert lrs_at(optimizer, schedule, 9) == pytest.approx([5e-4, 0.0, 0.0])
    schedule.on_phase_start(1, 10)
    assert lrs_at(optimizer, schedule, 10) == pytest.approx([1e-3, 5e-5, 0.0])
    assert lrs_at(optimizer, schedule, 11) == pytest.approx([1e-3, 1e-4, 0.0])
    schedule.on_phase_start(1, 12)  # replaying the running phase changes nothing
    assert lrs_at(optimizer, schedule, 12) == pytest.approx([1e-3, 1e-4, 0.0])


def test_step_enters_the_phase_of_its_epoch():
    phases = [PhaseConfig(0, "head", lr=1.0), PhaseConfig(1, "all", lr=2.0, reset_schedule=False)]
    optimizer, schedule = lr_setup("cosine", phases, epochs=2, min_lr=0.0)
    assert lrs_at(optimizer, schedule, 10) == pytest.approx([0.5, 1.0, 0.0])  # half-way down one cosine


def test_groups_without_phase_keys_are_refused():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="optimizer_param_groups"):
        LRSchedule(optimizer, ScheduleConfig(), [PhaseConfig()], 10, 1)


def test_state_dict_roundtrip_through_weights_only_save():
    phases = [PhaseConfig(0, "head", lr=1.0), PhaseConfig(1, "all", lr=0.1, warmup_epochs=0.5)]
    optimizer, schedule = lr_setup("plateau", phases, plateau_patience=0)
    schedule.on_eval(0.3)
    schedule.on_eval(0.2)
    lrs_at(optimizer, schedule, 12)
    buffer = io.BytesIO()
    torch.save(schedule.state_dict(), buffer)
    buffer.seek(0)
    restored_optimizer, restored = lr_setup("plateau", phases, plateau_patience=0)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    restored.on_phase_start(1, 12)
    for step in (13, 20, 29):
        assert lrs_at(restored_optimizer, restored, step) == lrs_at(optimizer, schedule, step)


# ---------------------------------------------------------------- LR scaling with the global batch


def scaled_optim(lr_scaling: str, reference: int | None = 32) -> OptimConfig:
    return OptimConfig(lr=3e-4, lr_scaling=lr_scaling, reference_global_batch=reference)


@pytest.mark.parametrize("lr_scaling,global_batch,expected", [
    ("linear", 128, 4.0), ("sqrt", 128, 2.0), ("none", 128, 1.0),
    ("linear", 8, 0.25), ("sqrt", 8, 0.5), ("linear", 32, 1.0), ("sqrt", 32, 1.0)])
def test_lr_scale_hand_computed(lr_scaling, global_batch, expected):
    assert lr_scale(scaled_optim(lr_scaling), global_batch) == pytest.approx(expected)


def test_global_batch_counts_accumulation_and_ranks():
    assert global_batch_size(batch_size=32, accumulation_steps=2, world_size=2) == 128


def test_warning_only_when_the_batch_differs_and_scaling_is_off():
    warning = lr_scaling_warning(scaled_optim("none"), 4096)
    assert warning is not None and "\n" not in warning
    assert "4096" in warning and "32" in warning and "optim.lr_scaling" in warning and "x128" in warning
    assert lr_scaling_warning(scaled_optim("none"), 32) is None
    assert lr_scaling_warning(scaled_optim("linear"), 4096) is None
    assert lr_scaling_warning(scaled_optim("none", reference=None), 4096) is None


PHASES = [PhaseConfig(0, "head", lr=1e-4), PhaseConfig(1, "last_2_layers", lr=1e-5), PhaseConfig(2, "all")]
"""Two phases with their own LR and one falling back to optim.lr (3e-4)."""

HAND_LRS = {"linear": [4e-4, 4e-5, 1.2e-3], "sqrt": [2e-4, 2e-5, 6e-4], "none": [1e-4, 1e-5, 3e-4]}
"""Each phase's LR at a global batch of 128 over a reference of 32: x4 linear, x2 sqrt, x1 none."""


@pytest.mark.parametrize("lr_scaling", sorted(HAND_LRS))
def test_every_phase_lr_scales_in_the_optimizer_and_the_schedule(lr_scaling):
    model = tiny_model()
    schedule = UnfreezeSchedule(UnfreezeConfig(PHASES), model)
    optim_cfg = scaled_optim(lr_scaling)
    scale = lr_scale(optim_cfg, global_batch_size(32, 2, 2))
    optimizer = build_optimizer(model, schedule, optim_cfg, scale)
    expected = HAND_LRS[lr_scaling]
    assert phase_peak_lrs(PHASES, optim_cfg, scale) == pytest.approx(expected)
    assert sorted({group["phase"] for group in optimizer.param_groups}) == [0, 1, 2]
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(expected[group["phase"]])
    lr_schedule = LRSchedule(optimizer, ScheduleConfig(kind="constant"), PHASES, 5, 3, batch_scale=scale)
    for epoch in range(3):
        lr_schedule.step(epoch * 5, epoch)
        for group in optimizer.param_groups:
            assert group["lr"] == pytest.approx(expected[group["phase"]] if group["phase"] <= epoch else 0.0)


def test_resume_on_another_world_size_scales_by_the_new_global_batch():
    """A checkpoint restores the optimizer's groups; the LR must follow the resumed run's global batch."""
    model = tiny_model()
    schedule = UnfreezeSchedule(UnfreezeConfig(PHASES[:1]), model)
    optim_cfg = scaled_optim("linear")
    saved = build_optimizer(model, schedule, optim_cfg, lr_scale(optim_cfg, 32)).state_dict()
    resumed = build_optimizer(model, schedule, optim_cfg, lr_scale(optim_cfg, 128))
    resumed.load_state_dict(saved)
    LRSchedule(resumed, ScheduleConfig(), PHASES[:1], 5, 1, batch_scale=lr_scale(optim_cfg, 128)).step(0, 0)
    head_lrs = [group["lr"] for group in resumed.param_groups if group["phase"] == 0]
    assert head_lrs == pytest.approx([4e-4, 4e-4])


# ---------------------------------------------------------------- ViTs unfreeze by transformer blocks


@pytest.mark.parametrize(("backbone", "final_norm"), [("test_vit", "norm"), ("test_vit2", "fc_norm")])
def test_last_n_blocks_of_a_vit_are_its_last_transformer_blocks_and_final_norm(backbone, final_norm):
    """test_vit pools the cls token after `norm`; test_vit2 averages and normalises with `fc_norm`
    (RETFound's fine-tuning layout), which timm's group_matcher names in no block."""
    model = tiny_model(backbone)
    depth = len(model.backbone.blocks)
    names = [name for name, _ in model.named_parameters()]
    head = {name for name in names if name.startswith("head.")}
    for count in (1, 2):
        last = tuple(f"backbone.blocks.{index}." for index in range(depth - count, depth))
        expected = head | {name for name in names if name.startswith(last + (f"backbone.{final_norm}.",))}
        assert trainable_names(model, f"last_{count}_blocks") == expected
    embeddings = {"backbone.pos_embed", "backbone.patch_embed.proj.weight"}
    assert embeddings <= trainable_names(model, f"last_{depth + 1}_blocks")
    assert not embeddings & trainable_names(model, f"last_{depth}_blocks")
