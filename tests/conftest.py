"""Shared fixtures: small WebDataset shard sets written in the tests' own tmp folders, free ports."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from torch.distributed.elastic.utils.distributed import get_free_port

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def jpeg_bytes(seed: int, size: int = 32, bright: bool = False) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 120, size=(size, size, 3), dtype=np.uint8)
    if bright:
        pixels[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 230
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_shards(folder: Path, split: str, sizes: list[int], positive_every: int = 3, size: int = 32,
                 corrupt: set[str] = frozenset()) -> list[Path]:
    """Shards of samples `<split>-<shard>-<index>` with .jpg and .cls; positives are brighter."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    counter = 0
    for shard, count in enumerate(sizes):
        path = folder / f"{split}-{shard:06d}.tar"
        with wds.TarWriter(str(path)) as writer:
            for index in range(count):
                key = f"{split}-{shard:02d}-{index:04d}"
                label = int(counter % positive_every == 0)
                image = b"not a jpeg at all" if key in corrupt else jpeg_bytes(counter, size, bool(label))
                writer.write({"__key__": key, "jpg": image, "cls": str(label).encode()})
                counter += 1
        paths.append(path)
    return paths


def free_port() -> int:
    return get_free_port()


@pytest.fixture(autouse=True)
def _signal_handlers_restored(monkeypatch):
    """Tests that call a command's `main()` in-process install its preemption handlers in pytest's own
    process; each test starts with the handlers, their owner and the notice flag as they were."""
    from dist_train.train import preemption

    monkeypatch.setattr(preemption, "_owner_pid", preemption._owner_pid)
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGUSR2)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)
    preemption.clear()


@pytest.fixture
def port() -> int:
    return free_port()


@dataclass(frozen=True)
class ShardSet:
    root: Path

    @property
    def train(self) -> str:
        return f"{self.root}/train-*.tar"

    @property
    def val(self) -> str:
        return f"{self.root}/val-*.tar"

    def overrides(self) -> list[str]:
        """The `--set` items that point a config at this set."""
        return [f"data.train_shards={self.train}", f"data.val_shards={self.val}"]


@pytest.fixture(scope="session")
def make_shards(tmp_path_factory) -> Callable[..., ShardSet]:
    """A factory of small shard sets: `make_shards(train=[16, 16], val=[16], **write_shards options)`."""

    def make(train: list[int] = (16, 16), val: list[int] = (16,), **options) -> ShardSet:
        root = tmp_path_factory.mktemp("shards")
        write_shards(root, "train", list(train), **options)
        write_shards(root, "val", list(val), **options)
        return ShardSet(root)

    return make


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory) -> Path:
    """The project's own synthetic fundus set, sharded with shards/build.py exactly as users do."""
    root = tmp_path_factory.mktemp("synthetic")
    images = root / "images"
    subprocess.run([sys.executable, str(REPO / "shards" / "synthetic.py"), "--out", str(images), "--n", "160",
                    "--positive-rate", "0.3", "--size", "96", "--seed", "3"], check=True, capture_output=True)
    out = root / "shards"
    subprocess.run([sys.executable, str(REPO / "shards" / "build.py"), "--images", str(images / "0"),
                    "--labels", str(images / "labels.csv"), "--out", str(out), "--size", "48",
                    "--shard-size", "30", "--val-fraction", "0.25", "--workers", "1"],
                   check=True, capture_output=True)
    return out
