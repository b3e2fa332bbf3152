"""The run's one optimizer and its LR schedule: groups by unfreeze phase, global-batch scaling, warmup and decay.

Every parameter is in the one optimizer from the start, grouped by (the phase in which it first trains,
decayed or not), so a checkpoint has one shape for the whole run (docs/UNFREEZE.md). The LR schedule
sets every group's LR before each optimizer step, from the step's place in training.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import nn

from dist_train.config import OptimConfig, PhaseConfig, ScheduleConfig
from dist_train.model.network import GlaucomaNet, model_no_weight_decay_names, no_weight_decay
from dist_train.model.unfreeze import NEVER, UnfreezeSchedule, phase_index_at, unwrap

# ---------------------------------------------------------------- optimizer


def optimizer_param_groups(model: nn.Module, schedule: UnfreezeSchedule, optim_cfg: OptimConfig,
                           batch_scale: float = 1.0) -> list[dict[str, Any]]:
    """Every parameter, grouped by (first phase that trains it, decayed or not).

    Keys: params, lr (base_lr x batch_scale), base_lr (the recipe's peak, before global-batch scaling),
    weight_decay, phase, decay. base_lr stays unscaled because a checkpoint restores it: a run resumed
    on another world size must scale the recipe's LR by its own global batch, not the saved one's.
    The NEVER group has lr 0 so that even a stray gradient cannot move it.
    """
    model = unwrap(model)
    exempt = model_no_weight_decay_names(cast(GlaucomaNet, model))  # unwrap() yields the GlaucomaNet trained
    buckets: dict[tuple[int, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        key = (schedule.first_phase_of(name), not no_weight_decay(name, param, exempt))
        buckets.setdefault(key, []).append(param)
    groups = []
    for phase_index, decay in sorted(buckets, key=lambda key: (key[0] == NEVER, key[0], not key[1])):
        lr = _phase_lr(schedule.phases, phase_index, optim_cfg)
        groups.append({"params": buckets[(phase_index, decay)], "lr": lr * batch_scale, "base_lr": lr,
                       "weight_decay": optim_cfg.weight_decay if decay else 0.0,
                       "phase": phase_index, "decay": decay})
    return groups


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
    `reset_schedule` restarts the plateau scale and the cosine at its start.

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
        for group in self.optimizer.param_groups:
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
        return lr

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
