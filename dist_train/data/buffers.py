"""Batch tensors written again once no one holds them: above all, a DataLoader worker's shared-memory batches.

A worker hands its batch to the main process as a tensor in shared memory. Allocated afresh for every
batch (torch's `default_collate` does so, and the DataLoader keeps no pool), each of its pages is
faulted in and zeroed by the kernel, then unmapped again: three quarters of what normalising a float batch
into shared memory cost a worker (bench/data_throughput.py, 384 px, batch 32: 51 ms into a new tensor,
12 ms into a reused one).
So each worker keeps up to `SLOTS` batch tensors and writes a batch into one the main process is done
with; when every one is still out it allocates a fresh tensor, as before, and waits for nothing.

"Done with" is when the last tensor on the storage dies in the main process, not when the loop moves on:
a CPU step's autograd graph keeps the input until backward, a caller may keep a view of a batch, and
a pinned copy lets go at once. A finalizer on the storage, armed when the batch is unpickled there
(`Lease.arm`), clears the slot's flag in a small shared tensor that the worker reads; a slot is written
only while its flag is clear, so a batch the main process can still read is never overwritten.
A loader without workers makes each batch a plain new tensor, as before. Hand-written because neither
torch nor webdataset has such a pool for DataLoader workers.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass

import torch
from torch.utils.data import get_worker_info

from dist_train import compat

SLOTS = 8
"""Per worker: the DataLoader's prefetch (2 per worker by default), the batch the loop holds, one in the
pinning thread and the one being written need five; the rest absorb a consumer that keeps a few."""


@dataclass
class Lease:
    """Slot `slot` of a worker's buffers, out with a batch until the main process drops its last tensor on it."""

    flags: torch.Tensor
    """One uint8 per slot, in shared memory: 1 while the main process may read that slot's tensor."""
    slot: int

    def arm(self, tensor: torch.Tensor) -> None:
        """In the receiving process: give the slot back when `tensor`'s storage dies (its views included)."""
        weakref.finalize(tensor.untyped_storage(), _give_back, self.flags, self.slot)


def _give_back(flags: torch.Tensor, slot: int) -> None:
    flags[slot] = 0


class BatchBuffers:
    """One worker's reusable shared batch tensors, allocated on first need (a pool never holds more than it
    lent)."""

    def __init__(self, slots: int = SLOTS):
        self.flags = compat.shared_empty((slots,), torch.uint8).zero_()
        self.tensors: list[torch.Tensor | None] = [None] * slots

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, Lease | None]:
        """A shared tensor of `shape` the main process holds nothing of, and its lease (None: a fresh tensor,
        every slot being out). A free slot of another shape (a validation set's last batch) is re-allocated."""
        free = [slot for slot, out in enumerate(self.flags.tolist()) if not out]
        if not free:
            return compat.shared_empty(shape, dtype), None
        fits = [slot for slot in free if _fits(self.tensors[slot], shape, dtype)]
        slot = fits[0] if fits else free[0]
        if not fits:
            self.tensors[slot] = compat.shared_empty(shape, dtype)
        self.flags[slot] = 1
        tensor = self.tensors[slot]
        assert tensor is not None
        return tensor, Lease(self.flags, slot)


def _fits(tensor: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
    return tensor is not None and tuple(tensor.shape) == shape and tensor.dtype == dtype


_pool: tuple[int, BatchBuffers] | None = None
"""This process's buffers and its pid: a worker forked from a process that had some starts its own."""


def batch_buffer(shape: tuple[int, ...], dtype: torch.dtype,
                 reuse: bool = True) -> tuple[torch.Tensor | None, Lease | None]:
    """In a DataLoader worker, a pooled shared tensor for a batch and the lease the batch carries to the main
    process (`reuse=False`: a new shared tensor, no lease, as before this module); elsewhere (None, None), a
    plain new tensor then: the pool holds its tensors, so in the process that uses them their storage would
    never die and no slot would come back."""
    global _pool
    if get_worker_info() is None:
        return None, None
    if not reuse:
        return compat.shared_empty(shape, dtype), None
    if _pool is None or _pool[0] != os.getpid():
        _pool = (os.getpid(), BatchBuffers())
    return _pool[1].take(shape, dtype)
