"""DeepSpeed ZeRO 0/1/2, with frozen parameters registered at initialisation and frozen afterwards.

DeepSpeed flattens (ZeRO >= 1) and partitions only the parameters it sees at initialisation, so every
parameter is `requires_grad` then; each phase afterwards sets `requires_grad` on exactly the parameters
it trains, as DDP does, so autograd never runs the frozen backbone's backward (a head-only phase costs
what it costs under DDP). DeepSpeed hands a parameter that got no gradient a zero one, and its group's
LR is zero. Its Adam state still advances on those zeros, so when a phase starts training a group,
that group's optimizer state is reset: its first updates then carry Adam's bias correction exactly as
under DDP, where the state is only created at the first real step.

channels_last: DeepSpeed's initial broadcast views every parameter as bytes, which a channels_last
weight refuses, so it is initialised on contiguous weights. ZeRO-0 keeps the module's parameters and
gets channels_last weights back; ZeRO 1-2 rebind them to views of their flat buffers, which can only be
contiguous, so there the inputs are made channels_last: a convolution with a channels_last input runs
in channels_last (cuDNN and oneDNN pick the layout if either operand has it), activations included, at
the cost of converting each conv weight (and its gradient) once per pass, small next to activations.

The flags of a step are read on the host before its update (`gates_on_device` False): ZeRO 1-2 read the
gradient norm on the host inside `step()` anyway (DeepSpeed's overflow check).

Precision is DeepSpeed's: its torch_autocast section (generated from train.precision in zero_config.py)
autocasts the forward inside the engine, so nothing here wraps it again.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dist_train import compat
from dist_train.config import Config
from dist_train.errors import CheckpointError, first_line
from dist_train.model.unfreeze import UnfreezeSchedule
from dist_train.train import distributed, sharded
from dist_train.train.distributed import DistEnv
from dist_train.train.engine.zero_config import AUTOCAST_DTYPES, check_deepspeed_file, deepspeed_config

__all__ = ["DeepSpeedEngine", "check_deepspeed_file", "deepspeed_config", "torch_optimizer"]

TAG = "deepspeed"
UNIVERSAL_TAG = "deepspeed_universal"
MODEL_STATES = "mp_rank_00_model_states.pt"
"""DeepSpeed's module state (parameters and buffers) in a tag folder, written by rank 0 (no model parallelism)."""


class DeepSpeedEngine:
    kind = "deepspeed"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: Config, env: DistEnv):
        config = deepspeed_config(cfg, env)  # refuses a contradicting user file before anything changes
        import deepspeed

        self.cfg, self.env, self.module = cfg, env, model
        for param in model.parameters():
            param.requires_grad_(True)
        if cfg.model.channels_last:
            model.to(memory_format=torch.contiguous_format)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=config, dist_init_required=False)
        if cfg.model.channels_last:
            self._restore_channels_last()
        if cfg.model.compile:  # DeepSpeed's own compile keeps the module, and the keys it saves, plain
            self.engine.compile()

    gates_on_device = False

    def _restore_channels_last(self) -> None:
        """ZeRO-0: the module's own parameters back in channels_last; ZeRO 1-2: channels_last inputs."""
        if self.cfg.engine.zero_stage == 0:
            self.module.to(memory_format=torch.channels_last)
        else:
            self.module.register_forward_pre_hook(_channels_last_input)

    def enter_phase(self, schedule: UnfreezeSchedule, phase: int) -> dict[str, Any]:
        """Only the phase's parameters require gradients (all stay registered); the groups it starts restart Adam."""
        info = schedule.apply(self.module, phase)
        self._reset_state_of_phase(phase)
        return info

    def _reset_state_of_phase(self, phase: int) -> None:
        inner = torch_optimizer(self.optimizer)
        for group in inner.param_groups:
            if group.get("phase") == phase:
                for param in group["params"]:
                    inner.state.pop(param, None)

    def autocast(self) -> contextlib.AbstractContextManager:
        """What DeepSpeed's torch_autocast runs the training forward under, on any device: evaluation matches it."""
        dtype = AUTOCAST_DTYPES.get(self.cfg.train.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=getattr(torch, dtype))

    def forward_backward(self, images: torch.Tensor, labels: torch.Tensor, loss_fn: nn.Module,
                         sync: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """DeepSpeed counts micro-batches itself and wants `step()` after every backward; the window's
        last one is the optimizer step, left to `optimizer_step`."""
        if sync != self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError("accumulation window out of step with DeepSpeed's micro-batch counter")
        logits = self.engine(images).float()
        loss = loss_fn(logits, labels)
        self.engine.backward(loss)
        if not sync:
            self.engine.step()
        return logits.detach(), loss.detach()

    def optimizer_step(self, skip: torch.Tensor | None = None) -> None:
        if skip is not None:
            raise RuntimeError("DeepSpeed cannot skip a step on the device; the loop reads the flags first")
        self.engine.step()

    def sync_buffers(self) -> None:
        sharded.broadcast_buffers(self.module, self.env)

    def save_tensors(self, folder: Path) -> None:
        universal_info = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}
        self.engine.save_checkpoint(str(folder), tag=TAG, client_state=universal_info)

    def load_tensors(self, folder: Path, saved_world_size: int) -> None:
        """Same world size, or ZeRO-0 (nothing partitioned): a direct load; ZeRO 1-2 on another size: universal
        (DeepSpeed's converter, run once by rank 0), then the buffers, which a universal load leaves out.
        Every file is first read by torch's weights-only unpickler (`refuse_unsafe_files`)."""
        refuse_unsafe_files(folder, self.env)
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
        _load_buffers(self.module, folder / TAG)

    def state_dict(self) -> dict[str, Any]:
        """fp16's loss scale: DeepSpeed checkpoints its counters, not torch_autocast's GradScaler."""
        scaler = compat.deepspeed_grad_scaler(self.engine)
        return {"scaler": scaler.state_dict()} if scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        scaler = compat.deepspeed_grad_scaler(self.engine)
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])


def _channels_last_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Forward pre-hook: the image batch in channels_last (see the module docstring)."""
    images, *rest = args
    return (images.contiguous(memory_format=torch.channels_last), *rest)


def refuse_unsafe_files(folder: Path, env: DistEnv) -> None:
    """Refuse a checkpoint whose DeepSpeed files hold anything but tensors, containers and DeepSpeed's own
    three small classes, before DeepSpeed unpickles them.

    DeepSpeed's loader, its universal converter and its universal loader all call `torch.load` with
    `weights_only=False`, which runs whatever a tampered file names. Each `.pt` file under `folder` is read
    here first by torch's weights-only unpickler, memory-mapped (no tensor data is read: 253 files of a
    test checkpoint took 0.17 s), allowing only the classes DeepSpeed 0.19 writes (found in every file
    of ZeRO 0-2 checkpoints, fp32/bf16/fp16, and their universal conversions). Each rank reads its share
    of the files (a universal checkpoint holds four per parameter) and every rank learns the verdict."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [LossScaler, ZeroStageEnum, fragment_address]
    files = sorted(folder.rglob("*.pt"))
    mine = [problem for path in files[env.rank::env.world_size] if (problem := _unsafe_problem(path, allowed))]
    problems = distributed.problems_of_all(env, mine)
    if problems:
        raise CheckpointError(problems[0])


def _unsafe_problem(path: Path, allowed: list[Any]) -> str | None:
    """Why `path` must not reach DeepSpeed's unpickler (it names more than torch's safe globals and `allowed`),
    or None."""
    try:
        with torch.serialization.safe_globals(allowed):
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError) as error:
        names = {f"{kind.__module__}.{kind.__qualname__}" for kind in allowed}
        found = [name for name in _globals_in(path) if name not in names]
        what = f"refers to {', '.join(found)}" if found else f"cannot be read safely ({first_line(error)})"
        return f"{path} {what}, which a DeepSpeed checkpoint never holds: refusing to let DeepSpeed unpickle it"
    return None


def _globals_in(path: Path) -> list[str]:
    """The classes and functions a torch.save file names beyond torch's safe ones ([] if it cannot say)."""
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip-format torch file: the refusal then quotes the load's own error
        return []


def _load_buffers(module: nn.Module, tag_folder: Path) -> None:
    """BatchNorm statistics from the saved module state: a universal load restores parameters only.

    (DeepSpeed skips the module state when loading a universal checkpoint; the statistics would stay
    those the model was built with.) The file holds rank 0's buffers, which the save synchronised."""
    saved = torch.load(tag_folder / MODEL_STATES, map_location="cpu", weights_only=True)["module"]
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            buffer.copy_(saved[name])


def torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
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
