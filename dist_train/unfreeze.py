"""Layer-wise unfreezing: which parameters train in each phase, the optimizer groups and the LR schedule.

Units of unfreezing, always counted from the OUTPUT end of the network:

- a *layer* is a module that owns parameters directly (`named_parameters(recurse=False)` is not
  empty): Conv, Linear, BatchNorm, timm's BatchNormAct2d, a ViT's root (cls_token, pos_embed), ...
  Layers are ordered by module registration order (`named_modules()`), which for timm's CNNs is the
  forward order; the head's layers come last.
- a *block* is one of timm's coarse parameter groups of the backbone
  (`group_parameters(backbone, backbone.group_matcher(coarse=True))`: stem, one per stage; the
  final conv of an EfficientNet joins the last stage), followed by our head as its own block.

Phase specs (`unfreeze.phases[i].train`):

- `head`: only our `.head` trains;
- `all`: everything trains;
- `last_N_layers`: the head plus the last N *backbone* layers (N larger than the backbone trains all);
- `last_N_blocks`: the head plus the last N *backbone* blocks.

N counts backbone units because the head always trains: `last_1_blocks` is "the last stage and
the head", not "the head alone", which `head` already says.

How phases run, and why the optimizer is never rebuilt, is in docs/UNFREEZE.md. In short: every
parameter is in the one optimizer from the start, grouped by the phase in which it first trains;
a frozen parameter has `requires_grad=False`, hence no gradient, and torch's optimizers skip it
entirely (no weight decay, no momentum, no state). Its state appears at its first real step.
"""

from __future__ import annotations

import bisect
import functools
import math
from typing import Any

import torch
from timm.models import group_parameters
from torch import nn
from torch.utils.hooks import RemovableHandle

from dist_train import compat
from dist_train.config import OptimConfig, PhaseConfig, ScheduleConfig, UnfreezeConfig
from dist_train.model import model_no_weight_decay_names, no_weight_decay

NEVER = -1
"""Phase index of the parameter group that no phase trains (lr 0)."""


def unwrap(model: nn.Module) -> nn.Module:
    """The GlaucomaNet inside DDP / DeepSpeed (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if compat.unwrap_compiled(model) is not model:
            model = compat.unwrap_compiled(model)
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            return model


# ---------------------------------------------------------------- layers, blocks and specs


def layers(model: nn.Module) -> list[tuple[str, list[str]]]:
    """(module name, full names of the parameters it owns directly), in registration order."""
    seen: set[int] = set()
    found = []
    for module_name, module in unwrap(model).named_modules():
        prefix = f"{module_name}." if module_name else ""
        names = []
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                names.append(prefix + param_name)
        if names:
            found.append((module_name, names))
    return found


def backbone_layers(model: nn.Module) -> list[tuple[str, list[str]]]:
    return [layer for layer in layers(model) if layer[0] == "backbone" or layer[0].startswith("backbone.")]


def blocks(model: nn.Module) -> list[list[str]]:
    """Full parameter names per block: timm's coarse groups of the backbone, then the head."""
    model = unwrap(model)
    backbone = model.backbone
    if not hasattr(backbone, "group_matcher"):
        raise ValueError(f"unfreeze: {type(backbone).__name__} has no timm group_matcher, so "
                         "last_N_blocks is undefined for it; use last_N_layers")
    groups = group_parameters(backbone, backbone.group_matcher(coarse=True))
    backbone_blocks = [[f"backbone.{name}" for name in groups[index]] for index in sorted(groups)]
    return backbone_blocks + [sorted(head_names(model))]


def head_names(model: nn.Module) -> set[str]:
    return {f"head.{name}" for name, _ in unwrap(model).head.named_parameters()}


def parse_spec(spec: str) -> tuple[str, int]:
    """('head' | 'all', 0) or ('layers' | 'blocks', N) for 'last_N_layers' / 'last_N_blocks'."""
    if spec in ("head", "all"):
        return spec, 0
    parts = spec.split("_")
    if len(parts) == 3 and parts[0] == "last" and parts[1].isdigit() and parts[2] in ("layers", "blocks"):
        return parts[2], int(parts[1])
    raise ValueError(f"unfreeze: train spec {spec!r} must be head, all, last_N_layers or last_N_blocks")


def trainable_names(model: nn.Module, spec: str) -> set[str]:
    """Full names of the parameters that train under `spec` (see the module docstring)."""
    model = unwrap(model)
    kind, count = parse_spec(spec)
    if kind == "all":
        return {name for name, _ in model.named_parameters()}
    chosen = head_names(model)
    if kind == "layers" and count:
        for _, names in backbone_layers(model)[-count:]:
            chosen.update(names)
    if kind == "blocks" and count:
        for names in blocks(model)[:-1][-count:]:
            chosen.update(names)
    return chosen


# ---------------------------------------------------------------- the phase schedule


class UnfreezeSchedule:
    """Which parameters train in which phase; switches `requires_grad` and BatchNorm modes in place.

    Modules are never replaced (unlike timm.utils.freeze, which swaps BatchNorm for a frozen copy),
    so an optimizer or checkpoint built before a phase change still holds the live parameters.
    """

    def __init__(self, cfg: UnfreezeConfig, model: nn.Module):
        self.cfg = cfg
        self.phases: list[PhaseConfig] = list(cfg.phases)
        self.phase_trainable = [frozenset(trainable_names(model, phase.train)) for phase in self.phases]
        self.current: int | None = None

    def phase_index_at(self, epoch: int) -> int:
        """Index of the phase that runs during `epoch` (0-based)."""
        return phase_index_at(self.phases, epoch)

    def first_phase_of(self, name: str) -> int:
        """The first phase in which parameter `name` trains, or NEVER (-1)."""
        return next((index for index, names in enumerate(self.phase_trainable) if name in names), NEVER)

    def trainable(self, phase_index: int | None = None) -> frozenset[str]:
        """Parameter names trainable in `phase_index` (default: the phase last applied)."""
        index = self.current if phase_index is None else phase_index
        if index is None:
            raise RuntimeError("UnfreezeSchedule: no phase applied yet; call apply(model, phase_index)")
        return self.phase_trainable[index]

    def apply(self, model: nn.Module, phase_index: int, *, set_requires_grad: bool = True) -> dict[str, Any]:
        """Enter `phase_index`: `requires_grad` on exactly its parameters (all, when not set_requires_grad).

        `set_requires_grad=False` is for DeepSpeed, which registers every parameter at init: there all
        stay trainable and the frozen ones are gated through `install_grad_gate`.
        """
        self.current = phase_index
        trainable = self.phase_trainable[phase_index]
        count = 0
        for name, param in unwrap(model).named_parameters():
            param.requires_grad_(name in trainable or not set_requires_grad)
            count += param.numel() if name in trainable else 0
        phase = self.phases[phase_index]
        return {"phase": phase_index, "train": phase.train, "trainable_params": count,
                "from_epoch": phase.from_epoch}

    def set_train_mode(self, model: nn.Module) -> None:
        """`model.train()`, then frozen BatchNorm layers back to eval (running statistics untouched).

        A frozen BN in train mode would still normalise with batch statistics and overwrite the
        running ones the pretrained weights rely on. BN layers without affine parameters are not
        known to be frozen and follow train mode.
        """
        model.train()
        if not self.cfg.frozen_bn_eval:
            return
        trainable = self.trainable()
        for module_name, module in unwrap(model).named_modules():
            is_norm = compat.is_batchnorm(module)
            if is_norm and _owns_only_frozen(module_name, module, trainable):
                module.eval()

    def install_grad_gate(self, model: nn.Module) -> list[RemovableHandle]:
        """Tensor hooks that zero each frozen parameter's gradient before anything else sees it.

        The hooks read the current phase at call time, so they are installed once for the run.
        They run before gradient accumulation and before DeepSpeed's reduction hooks.
        """
        return [param.register_hook(functools.partial(self._gate, name))
                for name, param in unwrap(model).named_parameters()]

    def _gate(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        return grad if name in self.trainable() else torch.zeros_like(grad)


def phase_index_at(phases: list[PhaseConfig], epoch: int) -> int:
    starts = [phase.from_epoch for phase in phases]
    return max(bisect.bisect_right(starts, epoch) - 1, 0)


def _owns_only_frozen(module_name: str, module: nn.Module, trainable: frozenset[str]) -> bool:
    prefix = f"{module_name}." if module_name else ""
    names = [prefix + name for name, _ in module.named_parameters(recurse=False)]
    return bool(names) and not any(name in trainable for name in names)


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
    exempt = model_no_weight_decay_names(model)
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
    if optim_cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas))
    if optim_cfg.name == "adam":
        return torch.optim.Adam(groups, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas))
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
