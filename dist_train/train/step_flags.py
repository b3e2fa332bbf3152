"""The per-step stop flags (a non-finite loss, a preemption notice), summed over ranks and read late.

Reading the all-reduced flags on the host before every update (`.tolist()`) makes the CPU wait for the
GPU at every step, so it never queues the next step's work ahead. Here the sum stays on the device:
when the engine can skip an update on the device (`Engine.gates_on_device`), every update is gated
on "some rank saw a non-finite loss at this step or an earlier unread one" and the host reads a step's
flags one step later. The bad step's update, and the one queued after it, are *skipped* on the device
rather than *prevented* by the host: weights and optimizer state stay those of the last good step on
every rank. Engines that cannot gate (DeepSpeed, whose ZeRO step reads the gradient norm on the host
anyway; DDP under fp16's GradScaler) read each step's flags before its update, as before.

A preemption notice read late checkpoints one step later; the checkpoint is still consistent, since it
is written after that step's update with the stream position of the same step. The loop settles every
unread flag before anything that saves or reports the state (`settle`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from dist_train.train import preemption
from dist_train.train.distributed import DistEnv


class NonFiniteLoss(Exception):
    """Some rank's loss at optimizer step `step` was not finite (the loop stops the run)."""

    def __init__(self, step: int):
        super().__init__(f"non-finite loss at optimizer step {step}")
        self.step = step


@dataclass
class StepFlags:
    """Each optimizer step's summed flags, kept on the device until `settle` reads them."""

    env: DistEnv
    late: bool
    """Whether updates are gated on the device and the host reads flags one step late."""
    skip: torch.Tensor | None = None
    """Sticky: true from the first step whose flags said non-finite (the gate for every later update)."""
    unread: list[tuple[int, torch.Tensor]] = field(default_factory=list)

    def add(self, step: int, non_finite: torch.Tensor) -> torch.Tensor | None:
        """Sum `step`'s flags over ranks without reading them; the gate for its update (None when not late)."""
        flags = torch.stack([non_finite.to(torch.float32),
                             torch.full((), float(preemption.requested()), device=non_finite.device)])
        self.unread.append((step, self._summed(flags)))
        if not self.late:
            return None
        bad = self.unread[-1][1][0] > 0
        self.skip = bad if self.skip is None else self.skip | bad
        return self.skip

    def _summed(self, flags: torch.Tensor) -> torch.Tensor:
        """The all-reduce, left on the device: NCCL queues it on the stream, the host does not wait."""
        if not self.env.is_distributed:
            return flags
        on_backend = flags if self.env.backend == "nccl" else flags.cpu()
        dist.all_reduce(on_backend)
        return on_backend

    def settle(self, keep_last: bool = False) -> bool:
        """Read the unread flags (all, or all but the newest); True when one carried a preemption notice.

        Raises NonFiniteLoss for the first step whose loss was not finite on some rank."""
        keep = self.unread[-1:] if keep_last else []
        reading, self.unread = self.unread[:len(self.unread) - len(keep)], keep
        preempted = False
        for step, flags in reading:
            bad, notice = (flags > 0).tolist()
            if bad:
                raise NonFiniteLoss(step)
            preempted = preempted or notice
        return preempted
