"""Checkpoints as named parts, published atomically, with retention and resume.

Layout of a run directory's checkpoints:

    checkpoints/step-00000120/      one complete checkpoint: the engine's tensors (DCP files or a
                                    DeepSpeed tag folder) and
        trainer.json                every resumable part that is not a tensor, by name (trainer
                                    progress, LR schedule, engine extras; per rank: stream position,
                                    RNG states), plus the run's metadata (config, tracking run id)
    checkpoints/latest              the name of the newest complete checkpoint
    checkpoints/best                the name of the best one by eval.metric

Every rank writes into `step-N.tmp/`; rank 0 then writes trainer.json, fsyncs, renames the folder to
`step-N/` and only then replaces `latest` (write + fsync + os.replace). A crash at any moment leaves
`latest` naming a complete checkpoint: a `.tmp` folder is never read and is cleaned at the next save.

trainer.json is JSON, never pickle, so a checkpoint from untrusted storage cannot run code; `encode`
and `decode` are the one codec for what JSON lacks (tensors, arrays, tuples in RNG states).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.distributed.checkpoint.api import CheckpointException

from dist_train import faults
from dist_train.errors import CheckpointError, one_line
from dist_train.train import distributed
from dist_train.train.distributed import DistEnv

if TYPE_CHECKING:  # the checkpoint format is read without the engines (export, resume checks)
    from dist_train.train.engine import Engine
    from dist_train.train.state import Stateful

log = logging.getLogger(__name__)

TRAINER_FILE = "trainer.json"


@dataclass
class Checkpointer:
    root: Path
    env: DistEnv
    keep_last: int = 2

    def save(self, step: int, engine: Engine, parts: Mapping[str, Stateful], rank_parts: Mapping[str, Stateful],
             meta: dict[str, Any]) -> Path:
        """Write a complete checkpoint or nothing; returns the published folder.

        `parts` are the run's shared parts (rank 0's are stored), `rank_parts` are stored for every rank."""
        name = checkpoint_name(step)
        final, staging = self.root / name, self.root / f"{name}.tmp"
        if self.env.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
        distributed.barrier(self.env)
        gathered = distributed.gather_to_main(self.env, encode_parts(rank_parts))
        faults.point("checkpoint.before_tensors")
        try:
            engine.sync_buffers()
            engine.save_tensors(staging)
        except (OSError, CheckpointException) as error:
            shutil.rmtree(staging, ignore_errors=True)
            raise self._failed(final, error) from None
        faults.point("checkpoint.after_tensors")
        distributed.barrier(self.env)
        failure = None
        if self.env.is_main:
            state = {**encode_parts(parts), **meta, "per_rank": gathered, "world_size": self.env.world_size,
                     "engine": engine.kind, "name": name}
            try:
                self._publish(staging, final, state)
            except (CheckpointError, OSError) as error:  # every rank ends with rank 0's line, none waits
                failure = str(error) if isinstance(error, CheckpointError) else str(self._failed(final, error))
        failure = distributed.broadcast_object(self.env, failure)
        if failure:
            raise CheckpointError(failure)
        return final

    def _publish(self, staging: Path, final: Path, state: dict[str, Any]) -> None:
        try:
            _write_durable(staging / TRAINER_FILE, json.dumps(state))
            _fsync_tree(staging)
        except OSError as error:
            shutil.rmtree(staging, ignore_errors=True)
            raise self._failed(final, error) from None
        faults.point("checkpoint.before_publish")
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        _fsync_dir(self.root)
        faults.point("checkpoint.before_latest")
        _write_pointer(self.root / "latest", final.name)
        self._retain()

    def _failed(self, final: Path, error: BaseException) -> CheckpointError:
        reason = one_line(error)
        if os.strerror(errno.ENOSPC) not in reason:
            reason += _full_disk(self.root)
        return CheckpointError(f"could not write checkpoint {final} ({reason}); the previous checkpoint, "
                               f"{read_pointer(self.root / 'latest')}, is intact")

    def restore(self, folder: Path, saved: dict[str, Any], engine: Engine, parts: Mapping[str, Stateful],
                rank_parts: Mapping[str, Stateful]) -> None:
        """Load the engine's tensors and every named part from `folder` (`saved` = `read_trainer_state`).

        Pass no `rank_parts` when the rank layout changed: another layout's positions mean nothing here."""
        if saved["engine"] != engine.kind:
            raise CheckpointError(f"{folder} was written by engine {saved['engine']}, this run uses {engine.kind}")
        engine.load_tensors(folder, saved["world_size"])
        for name, part in parts.items():
            part.load_state_dict(saved[name])
        mine = saved["per_rank"][self.env.rank] if rank_parts else {}
        for name, part in rank_parts.items():
            part.load_state_dict(mine[name])

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


# ---------------------------------------------------------------- the codec


def encode_parts(parts: Mapping[str, Stateful]) -> dict[str, Any]:
    return {name: encode(part.state_dict()) for name, part in parts.items()}


def encode(value: Any) -> Any:
    """JSON for RNG states and scaler dicts: tensors and arrays as tagged lists, tuples kept apart from lists."""
    if isinstance(value, torch.Tensor):
        return {"__tensor__": value.tolist(), "dtype": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, dict):
        return {str(k): encode(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return {"__tuple__": [encode(v) for v in value]}
    if isinstance(value, list):
        return [encode(v) for v in value]
    return value


def decode(value: Any) -> Any:
    if isinstance(value, dict):
        if "__tensor__" in value:
            return torch.tensor(value["__tensor__"], dtype=getattr(torch, value["dtype"]))
        if "__ndarray__" in value:
            return np.array(value["__ndarray__"], dtype=value["dtype"])
        if "__tuple__" in value:
            return tuple(decode(v) for v in value["__tuple__"])
        return {k: decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode(v) for v in value]
    return value


# ---------------------------------------------------------------- files


FULL_DISK_BYTES = 1 << 20
"""Free space below which a failed write is reported as a full disk."""


def _full_disk(folder: Path) -> str:
    """'; No space left on device (N bytes free on FOLDER)' when the disk is full, else ''.

    A short write inside torch's own file writer (torch.save, which DCP uses for some items) surfaces as
    "unexpected pos ..." with the errno lost; the free space says what happened."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return ""
    return f"; {os.strerror(errno.ENOSPC)} ({free} bytes free on {folder})" if free < FULL_DISK_BYTES else ""


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


def checkpoint_name(step: int) -> str:
    """The folder a checkpoint at `step` is published as (retention and pointers go by these names)."""
    return f"step-{step:08d}"


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
        path = path / str(read_pointer(path / "latest"))
    elif path.is_dir() and (path / "checkpoints" / "latest").is_file():
        path = path / "checkpoints" / str(read_pointer(path / "checkpoints" / "latest"))
    if not (path / TRAINER_FILE).is_file():
        raise CheckpointError(f"--resume {setting}: {path} is not a complete checkpoint (no {TRAINER_FILE})")
    return path


def read_trainer_state(folder: Path) -> dict[str, Any]:
    """trainer.json, decoded: every part as its `state_dict` was when saved."""
    return decode(json.loads((folder / TRAINER_FILE).read_text()))
