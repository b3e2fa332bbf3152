"""DistributedDataParallel: `no_sync` inside an accumulation window, DCP for the tensors.

Unfreezing keeps one optimizer for the run (see dist_train/model/unfreeze.py). A frozen parameter has
requires_grad=False, so its grad stays None and the optimizer skips it; the DDP wrapper is rebuilt at
a phase change because its reducer registers only the parameters that train when it is built.

The optimizer runs on torch's fused kernels (engine/gate.py), so a step can be skipped on the device
and the loop need not wait for the GPU to learn whether a loss was finite; fp16's GradScaler already
owns `found_inf`, so fp16 runs keep the host check (`gates_on_device` False).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from dist_train.config import Config
from dist_train.model.unfreeze import UnfreezeSchedule
from dist_train.train import sharded
from dist_train.train.distributed import DistEnv
from dist_train.train.engine import autocast, gate


class DDPEngine:
    kind = "ddp"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: Config, env: DistEnv):
        self.module, self.optimizer, self.cfg, self.env = model, gate.fused_twin(optimizer), cfg, env
        self.accumulation = cfg.train.accumulation_steps
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.train.precision == "fp16"
                                           and env.device.type == "cuda")
        self.gates_on_device = gate.can_skip_on_device(self.optimizer) and not self.scaler.is_enabled()
        self.wrapped = self._wrap()

    def _wrap(self) -> nn.Module:
        """DDP around the module, compiled outside DDP (`model.compile`) so its bucketed all-reduce still
        overlaps the backward; rebuilt, and so recompiled, at every phase change."""
        wrapped = self.module
        if self.env.is_distributed:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.env.device.index] if self.env.device.type == "cuda" else None
            wrapped = DistributedDataParallel(self.module, device_ids=device_ids,
                                              bucket_cap_mb=self.cfg.engine.bucket_cap_mb)
        # torch.compile of a module returns an OptimizedModule (an nn.Module); its stub says Callable
        return cast(nn.Module, torch.compile(wrapped)) if self.cfg.model.compile else wrapped

    def enter_phase(self, schedule: UnfreezeSchedule, phase: int) -> dict[str, Any]:
        info = schedule.apply(self.module, phase)
        self.wrapped = self._wrap()
        return info

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.cfg, self.env.device)

    def forward_backward(self, images: torch.Tensor, labels: torch.Tensor, loss_fn: nn.Module,
                         sync: bool) -> tuple[torch.Tensor, torch.Tensor]:
        no_sync = self.env.is_distributed and not sync
        # DDP's no_sync, reached through torch.compile's wrapper too (nn.Module's types do not know it)
        with cast(Any, self.wrapped).no_sync() if no_sync else contextlib.nullcontext():
            with self.autocast():
                logits = self.wrapped(images).float()
            loss = loss_fn(logits, labels)
            self.scaler.scale(loss / self.accumulation).backward()
        return logits.detach(), loss.detach()

    def optimizer_step(self, skip: torch.Tensor | None = None) -> None:
        if self.cfg.optim.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            params = [p for p in self.module.parameters() if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.grad_clip)
        if skip is None:
            self.scaler.step(self.optimizer)
        elif self.gates_on_device:
            gate.step_unless(self.optimizer, skip)
        else:
            raise RuntimeError("this DDP engine cannot skip a step on the device; check the flags first")
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def sync_buffers(self) -> None:
        sharded.broadcast_buffers(self.module, self.env)

    def save_tensors(self, folder: Path) -> None:
        sharded.save(folder, self.module, self.optimizer)

    def load_tensors(self, folder: Path, saved_world_size: int) -> None:
        sharded.load(folder, self.module, self.optimizer)

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
