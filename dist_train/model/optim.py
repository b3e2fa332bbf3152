"""The run's one optimizer and its LR schedule: groups by unfreeze phase, global-batch scaling, warmup and decay.

Every parameter is in the one optimizer from the start, grouped by (the phase in which it first trains,
decayed or not, and with `optim.layer_decay` its timm layer), so a checkpoint has one shape for the whole
run (docs/UNFREEZE.md). The LR schedule sets every group's LR before each optimizer step, from the step's
place in training, times the group's layer-decay scale.
"""

from __future__ import annotations

import math
from typing import Any, cast

import timm
import torch
from timm.models import group_parameters
from torch import nn

from dist_train.config import OptimConfig, PhaseConfig, ScheduleConfig
from dist_train.errors import UserError
from dist_train.model.network import GlaucomaNet, model_no_weight_decay_names, no_weight_decay
from dist_train.model.unfreeze import NEVER, UnfreezeSchedule, head_names, phase_index_at, timm_unmatched, unwrap

# ---------------------------------------------------------------- optimizer


def optimizer_param_groups(model: nn.Module, schedule: UnfreezeSchedule, optim_cfg: OptimConfig,
                           batch_scale: float = 1.0) -> list[dict[str, Any]]:
    """Every parameter, grouped by (first phase that trains it, decayed or not, layer under layer decay).

    Keys: params, lr (base_lr x batch_scale x lr_scale), base_lr (the recipe's peak, before global-batch
    scaling), weight_decay, phase, decay, layer and lr_scale (layer_decay ** layers below the head; 1 when
    off). base_lr stays unscaled because a checkpoint restores it: a run resumed on another world size
    must scale the recipe's LR by its own global batch, not the saved one's. The NEVER group has lr 0 so
    that even a stray gradient cannot move it. Without layer decay every parameter is in layer 0, so the
    groups (and the checkpoints of earlier runs) are the ones they always were.
    """
    model = unwrap(model)
    exempt = model_no_weight_decay_names(cast(GlaucomaNet, model))  # unwrap() yields the GlaucomaNet trained
    layer_of, top = decay_layers(model) if optim_cfg.layer_decay is not None else ({}, 0)
    buckets: dict[tuple[int, bool, int], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        key = (schedule.first_phase_of(name), not no_weight_decay(name, param, exempt), layer_of.get(name, 0))
        buckets.setdefault(key, []).append(param)
    groups = []
    for phase_index, decay, layer in sorted(buckets, key=_group_order):
        lr = _phase_lr(schedule.phases, phase_index, optim_cfg)
        scale = 1.0 if optim_cfg.layer_decay is None else optim_cfg.layer_decay ** (top - layer)
        groups.append({"params": buckets[(phase_index, decay, layer)], "lr": lr * batch_scale * scale,
                       "base_lr": lr, "weight_decay": optim_cfg.weight_decay if decay else 0.0,
                       "phase": phase_index, "decay": decay, "layer": layer, "lr_scale": scale})
    return groups


def _group_order(key: tuple[int, bool, int]) -> tuple[bool, int, bool, int]:
    """Phases in order (NEVER last), decayed first, then from the head down: the first group logged is
    phase 0's at its peak, as it is without layer decay."""
    phase_index, decay, layer = key
    return phase_index == NEVER, phase_index, not decay, -layer


class LayerDecayError(UserError, ValueError):
    """optim.layer_decay asked of a backbone timm cannot number the layers of."""


def decay_layers(model: nn.Module) -> tuple[dict[str, int], int]:
    """Each parameter's layer for layer-wise LR decay, and the top layer (our head's).

    timm's numbering, as `timm.optim.param_groups_layer_decay` makes it: the backbone's fine groups
    (`group_matcher(coarse=False)`) from the input; for a ViT 0 = patch/position embeddings and tokens,
    i + 1 = block i, the final `norm` in the last block. timm puts the parameters its matcher names in no
    group (its classifier, a ViT's fc_norm under avg pooling) in the top layer at full LR; our head takes
    the place of timm's classifier, so it is that top layer, or the one above the backbone's last when
    nothing is left there. This is MAE's and RETFound's rule: block i at layer_decay ** (depth - i).
    """
    model = unwrap(model)
    backbone = cast(Any, model.backbone)  # a timm model: group_matcher is timm's, beyond nn.Module's types
    _require_group_matcher(backbone)
    matcher = backbone.group_matcher(coarse=False)
    backbone_layers = group_parameters(backbone, matcher, reverse=True)
    highest = max(backbone_layers.values())
    top = highest if timm_unmatched(backbone, matcher) else highest + 1
    layer_of = {f"backbone.{name}": layer for name, layer in backbone_layers.items()}
    layer_of.update(dict.fromkeys(head_names(model), top))
    return layer_of, top


def check_layer_decay(backbone_name: str, layer_decay: float | None) -> None:
    """Refuse layer decay for a backbone timm cannot number, before any process starts (preflight).

    The backbone is built on the meta device: its structure without its memory or its init time."""
    if layer_decay is None:
        return
    with torch.device("meta"):
        _require_group_matcher(timm.create_model(backbone_name, pretrained=False, num_classes=0))


def _require_group_matcher(backbone: nn.Module) -> None:
    if not hasattr(backbone, "group_matcher"):
        raise LayerDecayError(f"optim.layer_decay: model.backbone {type(backbone).__name__} has no timm "
                              "group_matcher to number its layers by; set optim.layer_decay=null")


def _phase_lr(phases: list[PhaseConfig], phase_index: int, optim_cfg: OptimConfig) -> float:
    if phase_index == NEVER:
        return 0.0
    phase_lr = phases[phase_index].lr
    return optim_cfg.lr if phase_lr is None else phase_lr


def build_optimizer(model: nn.Module, schedule: UnfreezeSchedule, optim_cfg: OptimConfig,
                    batch_scale: float = 1.0) -> torch.optim.Optimizer:
    """The run's one optimizer (adamw, adam or sgd) over `optimizer_param_groups`.

    `adam` uses torch's coupled L2 `weight_decay`; `adamw` the decoupled one. `batch_scale` is
    the global-batch factor `lr_scale()` returns; the LRSchedule must be given the same one.
    """
    groups = optimizer_param_groups(model, schedule, optim_cfg, batch_scale)
    # OptimConfig.validate admits exactly two betas
    if optim_cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=cast("tuple[float, float]", tuple(optim_cfg.betas)))
    if optim_cfg.name == "adam":
        return torch.optim.Adam(groups, lr=optim_cfg.lr, betas=cast("tuple[float, float]", tuple(optim_cfg.betas)))
    if optim_cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=optim_cfg.lr, momentum=optim_cfg.momentum)
    raise ValueError(f"optim.name: unknown optimizer {optim_cfg.name!r} (adamw, adam, sgd)")


# ---------------------------------------------------------------- learning rate and global batch


def global_batch_size(batch_size: int, accumulation_steps: int, world_size: int) -> int:
    """Samples per optimizer step over all ranks: what an LR is tuned against."""
    return batch_size * accumulation_steps * world_size


def lr_scale(optim_cfg: OptimConfig, global_batch: int) -> float:
    """The factor every phase's LR is multiplied by at `global_batch` (1.0 when scaling is off).

    `linear` keeps the update per sample constant (Goyal et al., 2017); `sqrt` keeps the update's
    noise constant (Krizhevsky, 2014; Hoffer et al., 2017), the gentler choice for Adam.
    """
    reference = optim_cfg.reference_global_batch
    if optim_cfg.lr_scaling == "none" or reference is None:
        return 1.0
    ratio = global_batch / reference
    return ratio if optim_cfg.lr_scaling == "linear" else math.sqrt(ratio)


def lr_scaling_warning(optim_cfg: OptimConfig, global_batch: int) -> str | None:
    """One line for the log and the summary when the recipe runs at another global batch, unscaled."""
    reference = optim_cfg.reference_global_batch
    if optim_cfg.lr_scaling != "none" or reference is None or global_batch == reference:
        return None
    ratio = global_batch / reference
    return (f"global batch {global_batch} differs from optim.reference_global_batch {reference} and "
            f"optim.lr_scaling is none: the recipe's LRs are used unscaled; set optim.lr_scaling=linear "
            f"(LRs x{ratio:.4g}) or sqrt (x{math.sqrt(ratio):.4g}) to scale them")


def phase_peak_lrs(phases: list[PhaseConfig], optim_cfg: OptimConfig, batch_scale: float) -> list[float]:
    """The effective peak LR of each phase's new parameters (what the run should log)."""
    return [_phase_lr(phases, index, optim_cfg) * batch_scale for index in range(len(phases))]


# ---------------------------------------------------------------- learning-rate schedule


class LRSchedule:
    """Per-optimizer-step LR of every group: phase warmup times plateau / cosine / constant decay.

    A group's LR is 0 until its phase starts. Then `peak * warmup * decay`, where the peak is
    `base_lr * batch_scale` (batch_scale: the global-batch factor `lr_scale()` returns, not saved in
    the state, so a run resumed on another world size applies its own), warmup ramps linearly,
    (k + 1) / W at the k-th step of the phase, for the groups of the phase being warmed up, and
    the decay is 1 (constant), the plateau scale (floored at min_lr), or a cosine from the peak
    to min_lr between the end of warmup and the last step of the run. A phase with
    `reset_schedule` restarts the plateau scale and the cosine at its start. All of that is then
    multiplied by the group's layer-decay `lr_scale` (min_lr included, as timm and MAE do), taken
    from the groups as built for this run and not from a checkpoint: a restored optimizer state
    carries the saved run's scales, and a resume under another optim.layer_decay must apply its own.

    Call `step(global_step, epoch)` before each `optimizer.step()` (global_step = index of that
    step, from 0, counted in epochs of `steps_per_epoch` steps: `epoch * steps_per_epoch + steps
    into the epoch`, so that after a world-size change it still says how far training has got);
    `on_eval(metric)` after each evaluation (higher is better). `step` starts the
    phase of `epoch` itself; calling `on_phase_start` for the current phase is a no-op, so a
    resumed run can replay it safely after `load_state_dict`.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, schedule_cfg: ScheduleConfig,
                 phases: list[PhaseConfig], steps_per_epoch: int, epochs: int, batch_scale: float = 1.0):
        if any("phase" not in group or "base_lr" not in group for group in optimizer.param_groups):
            raise ValueError("LRSchedule: optimizer groups need 'phase' and 'base_lr' keys; "
                             "build them with optimizer_param_groups")
        self.optimizer, self.cfg, self.phases = optimizer, schedule_cfg, list(phases)
        self.batch_scale = batch_scale
        self.layer_scales = [float(group.get("lr_scale", 1.0)) for group in optimizer.param_groups]
        self.steps_per_epoch, self.total_steps = steps_per_epoch, steps_per_epoch * epochs
        first_warmup = phases[0].warmup_epochs
        self.phase_index = 0
        self.phase_start_step = 0
        self.warmup_steps = self._steps(schedule_cfg.warmup_epochs if first_warmup is None else first_warmup)
        self.decay_start_step = self.warmup_steps
        self.plateau_scale = 1.0
        self.best: float | None = None
        self.bad_evals = 0

    def step(self, global_step: int, epoch: int) -> None:
        """Set every group's LR for optimizer step `global_step` of `epoch`."""
        phase_index = phase_index_at(self.phases, epoch)
        if phase_index > self.phase_index:
            self.on_phase_start(phase_index, global_step)
        for group, layer_scale in zip(self.optimizer.param_groups, self.layer_scales, strict=True):
            group["lr_scale"] = layer_scale
            group["lr"] = self.lr_of(group, global_step)

    def lr_of(self, group: dict[str, Any], global_step: int) -> float:
        """The LR of one optimizer group at `global_step` (it needs the group's phase and base_lr)."""
        phase_index, peak = group["phase"], group["base_lr"] * self.batch_scale
        if phase_index == NEVER or phase_index > self.phase_index:
            return 0.0
        lr = self._decayed(peak, global_step)
        steps_in_phase = global_step - self.phase_start_step
        if phase_index == self.phase_index and steps_in_phase < self.warmup_steps:
            lr *= (max(steps_in_phase, 0) + 1) / self.warmup_steps
        return lr * group.get("lr_scale", 1.0)

    def _decayed(self, base_lr: float, global_step: int) -> float:
        floor = min(self.cfg.min_lr, base_lr)
        if self.cfg.kind == "plateau":
            return max(base_lr * self.plateau_scale, floor)
        if self.cfg.kind == "cosine":
            span = self.total_steps - self.decay_start_step
            progress = 1.0 if span <= 0 else min(max((global_step - self.decay_start_step) / span, 0.0), 1.0)
            return floor + (base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return base_lr

    def on_phase_start(self, phase_index: int, global_step: int) -> None:
        """Enter `phase_index` at `global_step`: its warmup, and a schedule reset if the phase asks."""
        if phase_index == self.phase_index:
            return
        if phase_index < self.phase_index:
            raise ValueError(f"LRSchedule: phase {phase_index} starts after phase {self.phase_index}")
        phase = self.phases[phase_index]
        self.phase_index, self.phase_start_step = phase_index, global_step
        self.warmup_steps = self._steps(phase.warmup_epochs or 0.0)
        if phase.reset_schedule:
            self.decay_start_step = global_step + self.warmup_steps
            self.plateau_scale, self.best, self.bad_evals = 1.0, None, 0

    def on_eval(self, metric_value: float) -> None:
        """Record an evaluation; with `plateau`, reduce after plateau_patience ones without improvement."""
        improved = not math.isnan(metric_value) and (self.best is None or metric_value > self.best)
        if improved:
            self.best, self.bad_evals = float(metric_value), 0
            return
        self.bad_evals += 1
        if self.cfg.kind == "plateau" and self.bad_evals >= self.cfg.plateau_patience:
            self.plateau_scale *= self.cfg.plateau_factor
            self.bad_evals = 0

    def rescale(self, ratio: float) -> None:
        """Convert the saved step counters to epochs `ratio` times as long (a resume on another world size).

        Each counter marks a fraction of training (a phase start, the end of a warmup), so each keeps its
        fraction: the LR at any later point equals the uninterrupted run's at the same fraction."""
        self.phase_start_step = round(self.phase_start_step * ratio)
        self.warmup_steps = round(self.warmup_steps * ratio)
        self.decay_start_step = round(self.decay_start_step * ratio)

    def state_dict(self) -> dict[str, Any]:
        """Plain Python values only (saveable with weights_only torch.save or DCP)."""
        return {key: getattr(self, key) for key in _LR_STATE_KEYS}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [key for key in _LR_STATE_KEYS if key not in state]
        if missing:
            raise ValueError(f"LRSchedule.load_state_dict: missing {', '.join(missing)}")
        for key in _LR_STATE_KEYS:
            setattr(self, key, state[key])

    def _steps(self, epochs: float) -> int:
        return round(epochs * self.steps_per_epoch)


_LR_STATE_KEYS = ("phase_index", "phase_start_step", "warmup_steps", "decay_start_step",
                  "plateau_scale", "best", "bad_evals")


def restore_settings(optimizer: torch.optim.Optimizer, model: nn.Module, schedule: UnfreezeSchedule,
                     optim_cfg: OptimConfig, batch_scale: float = 1.0) -> None:
    """The config's LR, weight decay and betas/momentum over the ones a loaded optimizer state restored.

    Loading an optimizer's state restores its parameter groups' hyper-parameters too: a resume with
    another optim.lr would silently keep the old one. The groups are the same (resume_check refuses
    another split), so freshly built groups say what each should hold."""
    fresh = optimizer_param_groups(model, schedule, optim_cfg, batch_scale)
    for group, new in zip(optimizer.param_groups, fresh):
        group["base_lr"], group["weight_decay"] = new["base_lr"], new["weight_decay"]
        if "betas" in group:
            group["betas"] = tuple(optim_cfg.betas)
        if "momentum" in group:
            group["momentum"] = optim_cfg.momentum
