"""DeepSpeed ZeRO 0/1/2, with frozen parameters gated instead of unregistered.

DeepSpeed flattens (ZeRO >= 1) and partitions only the parameters it sees at initialisation, so every
parameter is registered and stays `requires_grad`; a frozen one is gated: a gradient hook multiplies
its gradient by zero and its group's LR is zero. Its Adam state still advances while gated, so when a
phase starts training a group, that group's optimizer state is reset: its first updates then carry
Adam's bias correction exactly as under DDP, where the state is only created at the first real step.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from dist_train import compat, distributed
from dist_train.config import Config
from dist_train.distributed import DistEnv
from dist_train.errors import CheckpointError
from dist_train.train import sharded
from dist_train.train.engine import autocast
from dist_train.unfreeze import UnfreezeSchedule

TAG = "deepspeed"
UNIVERSAL_TAG = "deepspeed_universal"


class DeepSpeedEngine:
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

    def enter_phase(self, schedule: UnfreezeSchedule, phase: int) -> dict[str, Any]:
        """Parameters stay registered (the gate reads the schedule's phase); the groups it starts restart Adam."""
        info = schedule.apply(self.module, phase, set_requires_grad=False)
        self._reset_state_of_phase(phase)
        return info

    def _reset_state_of_phase(self, phase: int) -> None:
        inner = _torch_optimizer(self.optimizer)
        for group in inner.param_groups:
            if group.get("phase") == phase:
                for param in group["params"]:
                    inner.state.pop(param, None)

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.cfg, self.env.device)

    def forward_backward(self, images: torch.Tensor, labels: torch.Tensor, loss_fn: nn.Module,
                         sync: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """DeepSpeed counts micro-batches itself and wants `step()` after every backward; the window's
        last one is the optimizer step, left to `optimizer_step`."""
        if sync != self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError("accumulation window out of step with DeepSpeed's micro-batch counter")
        with self.autocast():
            logits = self.engine(images).float()
        loss = loss_fn(logits, labels)
        self.engine.backward(loss)
        if not sync:
            self.engine.step()
        return logits.detach(), loss.detach()

    def optimizer_step(self) -> None:
        self.engine.step()

    def sync_buffers(self) -> None:
        sharded.broadcast_buffers(self.module, self.env)

    def save_tensors(self, folder: Path) -> None:
        universal_info = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}
        self.engine.save_checkpoint(str(folder), tag=TAG, client_state=universal_info)

    def load_tensors(self, folder: Path, saved_world_size: int) -> None:
        """Same world size, or ZeRO-0 (nothing partitioned): a direct load; ZeRO 1-2 on another size: universal."""
        if saved_world_size == self.env.world_size or self.cfg.engine.zero_stage == 0:
            self.engine.load_checkpoint(str(folder), tag=TAG)
            return
        universal = folder / UNIVERSAL_TAG
        failure = None
        if self.env.is_main and not universal.is_dir():
            failure = _convert_universal(folder, universal)
        failure = distributed.broadcast_object(self.env, failure)
        if failure:
            raise CheckpointError(failure)
        compat.load_deepspeed_universal(self.engine, str(folder), UNIVERSAL_TAG)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """DeepSpeed restores its own counters and loss scale from its checkpoint."""


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside DeepSpeed's wrappers (ZeRO 1-2 keep one flat partition per group)."""
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def _convert_universal(folder: Path, universal: Path) -> str | None:
    """DeepSpeed's own converter, run on rank 0 into the checkpoint folder (published atomically).

    Returns the failure as one message (every rank raises it) instead of raising on rank 0 alone."""
    staging = universal.with_name(universal.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
               "--input_folder", str(folder / TAG), "--output_folder", str(staging),
               "--num_extract_workers", "1", "--num_merge_workers", "1"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        return f"converting {folder} to a universal checkpoint failed: {lines[-1] if lines else result.returncode}"
    os.replace(staging, universal)
    return None


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
    text = Path(path).read_text()
    return json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
