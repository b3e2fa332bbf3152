"""What an engine is: forward/backward of one micro-batch, the optimizer step, phase changes, its tensors.

The loop talks to this interface only; DDP and DeepSpeed differ inside their two classes (`ddp.py`,
`zero.py`). `kind` labels logs and checkpoints, nothing branches on it outside those classes.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from dist_train.config import Config
from dist_train.model.unfreeze import UnfreezeSchedule
from dist_train.train.distributed import DistEnv


class Engine(Protocol):
    kind: str
    module: nn.Module
    """The plain model (not the DDP/DeepSpeed wrapper): evaluation and export use it."""
    optimizer: torch.optim.Optimizer
    gates_on_device: bool
    """Whether `optimizer_step(skip)` can skip a step on the device; if not, the loop reads the flags first."""

    def forward_backward(self, images: torch.Tensor, labels: torch.Tensor, loss_fn: nn.Module,
                         sync: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward one micro-batch; `sync` on the last of an accumulation window.

        Returns the detached (logits, unscaled loss)."""
        ...

    def optimizer_step(self, skip: torch.Tensor | None = None) -> None:
        """Apply the accumulated gradients (after the window's last `forward_backward`).

        `skip`, a bool tensor on the device (only when `gates_on_device`): where true, the step changes
        neither the weights nor the optimizer state, and the host does not wait to find out."""
        ...

    def enter_phase(self, schedule: UnfreezeSchedule, phase: int) -> dict[str, Any]:
        """Train what unfreeze phase `phase` trains; returns the schedule's description of it."""
        ...

    def autocast(self) -> contextlib.AbstractContextManager:
        """The precision context the model's forward runs under (evaluation uses it too)."""
        ...

    def sync_buffers(self) -> None:
        """Make every rank's buffers (BatchNorm statistics) rank 0's: before evaluation and saving."""
        ...

    def save_tensors(self, folder: Path) -> None:
        """Write this rank's share of model and optimizer state into `folder` (a collective)."""
        ...

    def load_tensors(self, folder: Path, saved_world_size: int) -> None:
        """Restore model and optimizer from `folder`, written with `saved_world_size` ranks (a collective)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """The engine's non-tensor extras (loss-scaler state); JSON-encodable through the checkpoint codec."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ...


def autocast(cfg: Config, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast on GPU; CPU runs stay in fp32."""
    if device.type != "cuda" or cfg.train.precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def build_engine(model: nn.Module, optimizer: torch.optim.Optimizer, cfg: Config, env: DistEnv) -> Engine:
    if cfg.engine.kind == "deepspeed":
        from dist_train.train.engine.zero import DeepSpeedEngine

        return DeepSpeedEngine(model, optimizer, cfg, env)
    from dist_train.train.engine.ddp import DDPEngine

    return DDPEngine(model, optimizer, cfg, env)
