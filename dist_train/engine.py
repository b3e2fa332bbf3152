"""DDP or DeepSpeed behind one small interface: forward, backward, step at accumulation boundaries.

Unfreezing keeps one optimizer for the whole run (see dist_train/unfreeze.py). Under DDP a frozen
parameter has requires_grad=False, so its grad stays None and the optimizer skips it; the DDP wrapper
is rebuilt at a phase change because its reducer registers only trainable parameters. Under DeepSpeed
every parameter is registered at initialisation (ZeRO partitions only what it sees then) and frozen
ones are gated: a gradient hook multiplies their gradient by zero and their group's LR is zero.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torch import nn

from dist_train.config import Config
from dist_train.distributed import DistEnv
from dist_train.unfreeze import UnfreezeSchedule

log = logging.getLogger(__name__)


def autocast(cfg: Config, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast on GPU; CPU runs stay in fp32."""
    if device.type != "cuda" or cfg.train.precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float16
    return torch.autocast("cuda", dtype=dtype)


class DDPEngine:
    """DistributedDataParallel with no_sync on non-boundary micro-batches."""

    kind = "ddp"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: Config, env: DistEnv):
        self.module, self.optimizer, self.cfg, self.env = model, optimizer, cfg, env
        self.accumulation = cfg.train.accumulation_steps
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.train.precision == "fp16"
                                           and env.device.type == "cuda")
        self.micro_step = 0
        self.wrapped = self._wrap()

    def _wrap(self) -> nn.Module:
        if not self.env.is_distributed:
            return self.module
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.env.device.index] if self.env.device.type == "cuda" else None
        return DistributedDataParallel(self.module, device_ids=device_ids, bucket_cap_mb=self.cfg.engine.bucket_cap_mb)

    def on_phase_change(self) -> None:
        self.wrapped = self._wrap()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with autocast(self.cfg, self.env.device):
            return self.wrapped(images).float()

    @property
    def at_boundary(self) -> bool:
        return (self.micro_step + 1) % self.accumulation == 0

    def backward_context(self) -> contextlib.AbstractContextManager:
        """Skip DDP's all-reduce on every micro-batch but the last of an accumulation window."""
        if self.env.is_distributed and not self.at_boundary:
            return self.wrapped.no_sync()
        return contextlib.nullcontext()

    def train_micro_step(self, images: torch.Tensor, labels: torch.Tensor, loss_fn: nn.Module) -> tuple:
        """Forward and backward one micro-batch; returns (logits, loss) with the loss unscaled."""
        with self.backward_context():
            logits = self.forward(images)
            loss = loss_fn(logits, labels)
            self.scaler.scale(loss / self.accumulation).backward()
        return logits.detach(), loss.detach()

    def step(self) -> bool:
        """Apply the optimizer at an accumulation boundary; True when a step was taken."""
        boundary = self.at_boundary
        self.micro_step += 1
        if not boundary:
            return False
        if self.cfg.optim.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            params = [p for p in self.module.parameters() if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def state_extra(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict(), "micro_step": self.micro_step}

    def load_state_extra(self, state: dict[str, Any]) -> None:
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.micro_step = state.get("micro_step", 0)


class DeepSpeedEngine:
    """A DeepSpeed engine (ZeRO 0/1/2) with frozen parameters gated by gradient hooks."""

    kind = "deepspeed"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: Config, env: DistEnv,
                 schedule: UnfreezeSchedule):
        import deepspeed

        self.cfg, self.env, self.module = cfg, env, model
        for param in model.parameters():
            param.requires_grad_(True)
        schedule.install_grad_gate(model)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(cfg, env), dist_init_required=False)
        self.accumulation = cfg.train.accumulation_steps

    def on_phase_change(self) -> None:
        """Parameters stay registered; the gradient gate reads the schedule's current phase."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with autocast(self.cfg, self.env.device):
            return self.engine(images).float()

    @property
    def at_boundary(self) -> bool:
        return self.engine.is_gradient_accumulation_boundary()

    def train_micro_step(self, images: torch.Tensor, labels: torch.Tensor, loss_fn: nn.Module) -> tuple:
        logits = self.forward(images)
        loss = loss_fn(logits, labels)
        self.engine.backward(loss)
        return logits.detach(), loss.detach()

    def step(self) -> bool:
        boundary = self.at_boundary
        self.engine.step()
        return boundary

    @property
    def micro_step(self) -> int:
        return self.engine.micro_steps

    def state_extra(self) -> dict[str, Any]:
        return {}

    def load_state_extra(self, state: dict[str, Any]) -> None:
        """DeepSpeed restores its own counters from its checkpoint."""


def deepspeed_config(cfg: Config, env: DistEnv) -> dict[str, Any]:
    """The DeepSpeed JSON config generated from ours, with an optional user file merged under it."""
    ds: dict[str, Any] = {}
    if cfg.engine.deepspeed_config:
        ds.update(_read_structured(cfg.engine.deepspeed_config))
    ds.update({
        "train_micro_batch_size_per_gpu": cfg.train.batch_size,
        "gradient_accumulation_steps": cfg.train.accumulation_steps,
        "train_batch_size": cfg.train.batch_size * cfg.train.accumulation_steps * env.world_size,
        "zero_optimization": {**ds.get("zero_optimization", {}), "stage": cfg.engine.zero_stage},
        "steps_per_print": 1 << 30,
        "zero_allow_untested_optimizer": True,  # our client optimizers are torch's own SGD/Adam/AdamW
        "wall_clock_breakdown": False,
    })
    if cfg.optim.grad_clip is not None:
        ds["gradient_clipping"] = cfg.optim.grad_clip
    return ds


def _read_structured(path: str) -> dict[str, Any]:
    import json
    from pathlib import Path

    import yaml

    text = Path(path).read_text()
    return json.loads(text) if path.endswith(".json") else yaml.safe_load(text)


def build_engine(model: nn.Module, optimizer: torch.optim.Optimizer, cfg: Config, env: DistEnv,
                 schedule: UnfreezeSchedule) -> DDPEngine | DeepSpeedEngine:
    if cfg.engine.kind == "deepspeed":
        return DeepSpeedEngine(model, optimizer, cfg, env, schedule)
    return DDPEngine(model, optimizer, cfg, env)

