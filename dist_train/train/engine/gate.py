"""Skipping an optimizer step on the device: how an update is gated without the host reading a flag.

The loop learns that a step's loss was non-finite only when it reads the all-reduced flag, and reading
it waits for the GPU. To let the CPU run a step ahead, the update itself must be conditional on a
device tensor. torch's fused Adam/AdamW/SGD kernels take exactly that: the `found_inf` tensor amp's
GradScaler hands them (`_step_supports_amp_scaling`); when it is 1 the kernel leaves parameters,
moments and momentum untouched and the step counter is put back. Other implementations (foreach,
single-tensor) refuse `found_inf`, so the engine asks for the fused twin of the optimizer it was given:
same class, same parameter groups and hyper-parameters (on CPU, AdamW's fused and foreach updates were
bitwise equal in our check; on CUDA they agree to rounding).
"""

from __future__ import annotations

from typing import Any

import torch

FUSED_CLASSES = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)
"""torch optimizers whose fused kernels honour `found_inf` (all the ones optim.py builds)."""


def can_skip_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `step_unless` can skip a step of `optimizer` without a host read."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def fused_twin(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """`optimizer` rebuilt on its own parameter groups with torch's fused kernels, when torch has them.

    Returned unchanged when it is fused already, has state (a rebuild would drop it), is another class,
    or holds a parameter the fused kernels do not take (not floating point, or on an unsupported device).
    """
    if can_skip_on_device(optimizer) or optimizer.state or type(optimizer) not in FUSED_CLASSES:
        return optimizer
    params = [param for group in optimizer.param_groups for param in group["params"]]
    supported = _fused_devices()
    if not all(param.is_floating_point() and param.device.type in supported for param in params):
        return optimizer
    groups = [{**group, "fused": True, "foreach": None} for group in optimizer.param_groups]
    fused_class: Any = type(optimizer)  # one of FUSED_CLASSES, whose constructors take `fused`
    return fused_class(groups, fused=True)


def _fused_devices() -> set[str]:
    """The device types torch has fused optimizer kernels for (a private helper of torch.optim)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    return set(_get_fused_kernels_supported_devices())


def step_unless(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """`optimizer.step()`, a no-op on the device where `skip` (a bool tensor) is true; nothing waits for it.

    `found_inf`/`grad_scale` are the attributes GradScaler sets around the step of such an optimizer;
    `grad_scale=None` because the gradients are not scaled."""
    optimizer.found_inf = skip.to(torch.float32)  # type: ignore[attr-defined]
    optimizer.grad_scale = None  # type: ignore[attr-defined]
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf, optimizer.grad_scale  # type: ignore[attr-defined]
