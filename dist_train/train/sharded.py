"""The model and optimizer as a DCP checkpoint: every rank writes its share, any world size loads it.

DCP's `.metadata` file is a pickle. `SafeMetadataReader` unpickles it with an allow-list of the classes
DCP itself writes there, so a tampered checkpoint cannot run code when it is resumed or exported.
"""

from __future__ import annotations

import contextlib
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint import FileSystemReader

from dist_train import compat
from dist_train.errors import CheckpointError
from dist_train.train.distributed import DistEnv


def save(folder: Path, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(module, optimizer)
    with _quiet_when_alone():
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder), no_dist=_alone())


def load(folder: Path, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Restore into the live module and optimizer; DCP reshards when the world size changed."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(module, optimizer)
    holder: dict[str, Any] = {"model": model_state, "optim": optim_state}
    with _quiet_when_alone():
        dcp.load(holder, storage_reader=SafeMetadataReader(str(folder)), no_dist=_alone())
    set_state_dict(module, optimizer, model_state_dict=holder["model"], optim_state_dict=holder["optim"])


def _alone() -> bool:
    return not dist.is_initialized()


@contextlib.contextmanager
def _quiet_when_alone() -> Iterator[None]:
    """A one-process run saves without a group on purpose; DCP would warn that it assumes so at every save."""
    with warnings.catch_warnings():
        if _alone():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def model_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The model's tensors of a DCP checkpoint, consolidated in one process (export)."""
    return compat.load_dcp_everything(SafeMetadataReader(str(folder)))["model"]


def broadcast_buffers(module: nn.Module, env: DistEnv) -> None:
    """BatchNorm statistics differ per rank after the last forward: make every rank's rank 0's.

    Before evaluation (every rank scores with the same model) and before saving (DCP stores one copy
    of a replicated tensor, not necessarily rank 0's). One flattened broadcast per dtype instead of
    one per buffer (150 on efficientnet_b0).
    """
    if not env.is_distributed:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for buffer in module.buffers():
        by_dtype.setdefault(buffer.dtype, []).append(buffer.data)
    for buffers in by_dtype.values():
        flat = compat.flatten(buffers)
        on_device = flat.to(env.device) if env.backend == "nccl" else flat
        dist.broadcast(on_device, src=0)
        for buffer, synced in zip(buffers, compat.unflatten(on_device, buffers)):
            buffer.copy_(synced)


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's .metadata is a pickle; only the classes DCP itself writes there may be loaded from it."""

    ALLOWED = {
        ("torch.distributed.checkpoint.metadata", name) for name in (
            "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
            "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
    } | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
         ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("collections", "OrderedDict")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                               torch.dtype)):
            return super().find_class(module, name)
        raise CheckpointError(f"checkpoint metadata refers to {module}.{name}, which a checkpoint never holds: "
                              f"refusing to load it")


class SafeMetadataReader(FileSystemReader):
    """torch's FileSystemReader with a metadata unpickler that cannot run code from a tampered checkpoint."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        from torch.distributed.checkpoint.metadata import StorageMeta

        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = _MetadataUnpickler(stream).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
