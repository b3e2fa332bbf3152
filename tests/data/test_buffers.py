"""Reused batch tensors (dist_train/data/buffers.py): fewer shared-memory blocks, and no batch overwritten while held.

The oracle for the pixels is each sample decoded on its own (`Decoder.__call__`, `to_normalised_tensor` per
image) and stacked; for the reuse, the inode the kernel gives each shared-memory block a batch arrives in.
"""

from __future__ import annotations

import os

import torch

from dist_train.config import DataConfig
from dist_train.data.stream import Decoder, EvalStream, iterate_shard, make_loader

from conftest import write_shards

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
BATCH, SAMPLES = 4, 96


def loader(tmp_path, workers):
    urls = [str(path) for path in write_shards(tmp_path, "val", [SAMPLES])]
    data = DataConfig(train_shards="x", val_shards="y", workers=workers)
    expected = {sample["__key__"]: Decoder(32, MEAN, STD)(sample, 0) for sample in iterate_shard(urls[0])}
    return make_loader(EvalStream(urls, Decoder(32, MEAN, STD), BATCH, 0, 1, workers), data, False), expected


def oracle(expected, keys):
    return torch.stack([expected[key] for key in keys])


def inode(tensor: torch.Tensor) -> int:
    fd, _ = tensor.untyped_storage()._share_fd_cpu_()
    return os.fstat(fd).st_ino


def test_a_worker_sends_its_batches_in_a_few_reused_shared_blocks(tmp_path):
    """Before, every batch came in a shared-memory block of its own (24 inodes for 24 batches), each page of it
    faulted in and zeroed by the kernel. A consumer that lets go of each batch gets them in at most eight."""
    batches, expected = loader(tmp_path, workers=1)
    inodes = []
    for batch in batches:
        inodes.append(inode(batch.images))
        torch.testing.assert_close(batch.images, oracle(expected, batch.keys), rtol=0, atol=0)
    assert len(inodes) == SAMPLES // BATCH
    assert len(set(inodes)) <= 8, f"{len(set(inodes))} shared blocks for {len(inodes)} batches"


def test_a_batch_still_held_is_never_written_again(tmp_path):
    """Held four ways while the epoch goes on: the batch itself, only a view of it, only a detached tensor on
    its storage (no tie to the batch's tensor object), and only an autograd graph that saved it as a
    convolution's input (a CPU training step until its backward). Each must still hold its own samples at
    the end, though far more batches than the pool's slots came after it."""
    batches, expected = loader(tmp_path, workers=1)
    conv = torch.nn.Conv2d(3, 2, 3)
    whole, views, detached, graphs = [], [], [], []
    for index, batch in enumerate(batches):
        keys = list(batch.keys)
        if index % 4 == 0:
            whole.append((batch, keys))
        elif index % 4 == 1:
            views.append((batch.images[1:], keys))
        elif index % 4 == 2:
            detached.append((batch.images.detach(), keys))
        else:
            graphs.append((conv(batch.images), keys))
        del batch
    assert whole and views and detached and graphs
    for batch, keys in whole:
        torch.testing.assert_close(batch.images, oracle(expected, keys), rtol=0, atol=0)
    for view, keys in views:
        torch.testing.assert_close(view, oracle(expected, keys)[1:], rtol=0, atol=0)
    for tensor, keys in detached:
        torch.testing.assert_close(tensor, oracle(expected, keys), rtol=0, atol=0)
    for output, keys in graphs:
        torch.testing.assert_close(output.grad_fn._saved_input, oracle(expected, keys), rtol=0, atol=0)
