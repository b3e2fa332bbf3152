"""Every use of a private API of torch, DeepSpeed or submitit, in one place, each with the reason.

A library upgrade that moves one of these breaks here and in the test that exercises it, not somewhere
inside the loop: tests/test_compat.py for the torch ones; the DeepSpeed ones in
tests/train/test_deepspeed_resume.py (universal load) and test_deepspeed_precision.py (fp16 scaler);
`submission_text` in tests/test_submit_local.py (`--dry-run`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One contiguous buffer of same-dtype tensors: one broadcast instead of one per BatchNorm buffer.

    torch's DDP uses the same private helpers for its buffer broadcast."""
    from torch._utils import _flatten_dense_tensors

    return _flatten_dense_tensors(tensors)


def unflatten(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    from torch._utils import _unflatten_dense_tensors

    return list(_unflatten_dense_tensors(flat, like))


def load_dcp_everything(storage_reader: Any) -> dict[str, Any]:
    """Every tensor of a DCP checkpoint without knowing its keys, in one process.

    The public `dcp.load` only fills keys it is given; torch's own `dcp_to_torch_save` takes this same
    private entry point, which lets us pass a reader whose metadata unpickler runs no code."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict[str, Any] = {}
    _load_state_dict(state, storage_reader=storage_reader, planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    return state


def load_deepspeed_universal(engine: Any, folder: str, tag: str) -> None:
    """Load a universal checkpoint into an initialised DeepSpeed engine.

    DeepSpeed reads `load_universal_checkpoint` from its config at load time and has no argument for
    it; the flag is set for this one load and restored after."""
    config = engine._config
    config.load_universal_checkpoint = True
    try:
        engine.load_checkpoint(folder, tag=tag)
    finally:
        config.load_universal_checkpoint = False


def deepspeed_grad_scaler(engine: Any) -> Any:
    """The GradScaler DeepSpeed made for torch_autocast fp16 (the engine's under ZeRO-0, the ZeRO optimizer's
    otherwise), or None. DeepSpeed does not checkpoint it; the engine saves its state with the run's."""
    scaler = getattr(engine, "torch_autocast_z0_gradscaler", None)
    return scaler if scaler is not None else getattr(engine.optimizer, "torch_autocast_gradscaler", None)


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module inside a torch.compile wrapper (`OptimizedModule` keeps it as `_orig_mod`)."""
    return getattr(model, "_orig_mod", model)


def is_batchnorm(module: nn.Module) -> bool:
    """BatchNorm1d/2d/3d and SyncBatchNorm share only the private base class `_BatchNorm`."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def submission_text(executor: Any) -> str:
    """The sbatch script submitit would submit, for `--dry-run`: submitit has no public call for it."""
    return executor._make_submission_file_text(executor._submitit_command_str, uid="dry-run")


def shared_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor in shared memory, allocated there (no copy), as torch's own `default_collate`
    allocates a worker's batch: a DataLoader worker that fills it sends only its handle to the main process."""
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(math.prod(shape))
    return torch.empty(0, dtype=dtype).new(storage).view(shape)
