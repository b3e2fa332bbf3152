"""Sharded checkpoints with atomic publish, retention and resume.

Layout of a run directory's checkpoints:

    checkpoints/step-00000120/      one complete checkpoint (DCP files or a DeepSpeed tag folder)
        trainer.json                everything that is not a tensor: epoch, step, data positions and RNG
                                    states per rank, schedules, unfreeze phase, config, tracking run id
    checkpoints/latest              the name of the newest complete checkpoint
    checkpoints/best                the name of the best one by eval.metric

Every rank writes into `step-N.tmp/`; rank 0 then writes trainer.json, fsyncs, renames the folder to
`step-N/` and only then replaces `latest` (write + fsync + os.replace). A crash at any moment leaves
`latest` naming a complete checkpoint: a `.tmp` folder is never read and is cleaned at the next save.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException

from dist_train import distributed, faults
from dist_train.distributed import DistEnv

log = logging.getLogger(__name__)

TRAINER_FILE = "trainer.json"


class CheckpointError(RuntimeError):
    pass


@dataclass
class Checkpointer:
    root: Path
    env: DistEnv
    engine_kind: str
    keep_last: int = 2

    def save(self, step: int, engine: Any, trainer_state: dict[str, Any], per_rank: dict[str, Any]) -> Path:
        """Write a complete checkpoint or nothing; returns the published folder."""
        name = f"step-{step:08d}"
        final, staging = self.root / name, self.root / f"{name}.tmp"
        if self.env.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
        distributed.barrier(self.env)
        gathered = distributed.gather_to_main(self.env, per_rank)
        faults.point("checkpoint.before_tensors")
        try:
            self._write_tensors(staging, engine)
        except (OSError, CheckpointException) as error:
            shutil.rmtree(staging, ignore_errors=True)
            raise CheckpointError(f"could not write checkpoint {final} ({_last_line(error)}); the previous "
                                  f"checkpoint, {read_pointer(self.root / 'latest')}, is intact") from None
        faults.point("checkpoint.after_tensors")
        distributed.barrier(self.env)
        if self.env.is_main:
            state = {**trainer_state, "per_rank": gathered, "world_size": self.env.world_size,
                     "engine": self.engine_kind, "name": name}
            try:
                _write_durable(staging / TRAINER_FILE, json.dumps(state))
                _fsync_tree(staging)
            except OSError as error:
                shutil.rmtree(staging, ignore_errors=True)
                raise CheckpointError(f"could not write checkpoint {final} ({error}); the previous checkpoint, "
                                      f"{read_pointer(self.root / 'latest')}, is intact") from None
            faults.point("checkpoint.before_publish")
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
            _fsync_dir(self.root)
            faults.point("checkpoint.before_latest")
            _write_pointer(self.root / "latest", name)
            self._retain()
        distributed.barrier(self.env)
        return final

    def _write_tensors(self, folder: Path, engine: Any) -> None:
        if self.engine_kind == "deepspeed":
            universal_info = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}
            engine.engine.save_checkpoint(str(folder), tag="deepspeed", client_state=universal_info)
            return
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        _broadcast_buffers(engine.module, self.env)
        model_state, optim_state = get_state_dict(engine.module, engine.optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder))

    def mark_best(self, name: str) -> None:
        if self.env.is_main:
            _write_pointer(self.root / "best", name)

    def _retain(self) -> None:
        """Keep the newest `keep_last` checkpoints plus the best; remove stale staging folders."""
        keep = {read_pointer(self.root / "latest"), read_pointer(self.root / "best")}
        published = sorted(p for p in self.root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
        keep.update(p.name for p in published[-self.keep_last:])
        for folder in self.root.glob("step-*"):
            if folder.name not in keep:
                shutil.rmtree(folder, ignore_errors=True)


def _last_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _broadcast_buffers(module: torch.nn.Module, env: DistEnv) -> None:
    """BatchNorm statistics differ per rank after the last forward; DCP stores one copy: make it rank 0's.

    One flattened broadcast per dtype instead of one per buffer (150 on efficientnet_b0).
    """
    if not env.is_distributed:
        return
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for buffer in module.buffers():
        by_dtype.setdefault(buffer.dtype, []).append(buffer.data)
    for buffers in by_dtype.values():
        flat = _flatten_dense_tensors(buffers)
        dist.broadcast(flat, src=0)
        for buffer, synced in zip(buffers, _unflatten_dense_tensors(flat, buffers)):
            buffer.copy_(synced)


def _write_durable(path: Path, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _write_pointer(path: Path, name: str) -> None:
    staging = path.with_name(path.name + ".tmp")
    _write_durable(staging, name)
    os.replace(staging, path)
    _fsync_dir(path.parent)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's .metadata is a pickle; only the classes DCP itself writes there may be loaded from it."""

    ALLOWED = {
        ("torch.distributed.checkpoint.metadata", name) for name in (
            "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
            "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
    } | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
         ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("collections", "OrderedDict")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                               torch.dtype)):
            return super().find_class(module, name)
        raise CheckpointError(f"checkpoint metadata refers to {module}.{name}, which a checkpoint never holds: "
                              f"refusing to load it")


class SafeMetadataReader(FileSystemReader):
    """torch's FileSystemReader with a metadata unpickler that cannot run code from a tampered checkpoint."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        from torch.distributed.checkpoint.metadata import StorageMeta

        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = _MetadataUnpickler(stream).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def read_pointer(path: Path) -> str | None:
    return path.read_text().strip() if path.is_file() else None


def resolve_resume(setting: str, run_dir: Path) -> Path | None:
    """The checkpoint folder to resume from: 'auto' = latest in the run directory, 'none', or a path."""
    if setting == "none":
        return None
    if setting == "auto":
        name = read_pointer(run_dir / "checkpoints" / "latest")
        return run_dir / "checkpoints" / name if name else None
    path = Path(setting)
    if path.is_dir() and (path / "latest").is_file():
        path = path / read_pointer(path / "latest")
    elif path.is_dir() and (path / "checkpoints" / "latest").is_file():
        path = path / "checkpoints" / read_pointer(path / "checkpoints" / "latest")
    if not (path / TRAINER_FILE).is_file():
        raise CheckpointError(f"--resume {setting}: {path} is not a complete checkpoint (no {TRAINER_FILE})")
    return path


def read_trainer_state(folder: Path) -> dict[str, Any]:
    return json.loads((folder / TRAINER_FILE).read_text())


def load_tensors(folder: Path, engine: Any, env: DistEnv, saved_world_size: int) -> None:
    """Restore model and optimizer; DCP reshards to any world size, DeepSpeed goes through universal."""
    state = read_trainer_state(folder)
    if state["engine"] != engine.kind:
        raise CheckpointError(f"{folder} was written by engine {state['engine']}, this run uses {engine.kind}")
    if engine.kind == "deepspeed":
        _load_deepspeed(folder, engine, env, saved_world_size)
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(engine.module, engine.optimizer)
    holder = {"model": model_state, "optim": optim_state}
    dcp.load(holder, storage_reader=SafeMetadataReader(str(folder)))
    set_state_dict(engine.module, engine.optimizer, model_state_dict=holder["model"],
                   optim_state_dict=holder["optim"])


def _load_deepspeed(folder: Path, engine: Any, env: DistEnv, saved_world_size: int) -> None:
    if saved_world_size == env.world_size:
        engine.engine.load_checkpoint(str(folder), tag="deepspeed")
        return
    universal = folder / "deepspeed_universal"
    if env.is_main and not universal.is_dir():
        _convert_universal(folder, universal)
    distributed.barrier(env)
    engine.engine._config.load_universal_checkpoint = True
    engine.engine.load_checkpoint(str(folder), tag="deepspeed_universal")
    engine.engine._config.load_universal_checkpoint = False


def _convert_universal(folder: Path, universal: Path) -> None:
    """DeepSpeed's own converter, run on rank 0 into the checkpoint folder (then published atomically)."""
    import subprocess
    import sys

    staging = universal.with_name(universal.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
               "--input_folder", str(folder / "deepspeed"), "--output_folder", str(staging),
               "--num_extract_workers", "1", "--num_merge_workers", "1"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise CheckpointError(f"converting {folder} to a universal checkpoint failed: {result.stderr[-2000:]}")
    os.replace(staging, universal)
