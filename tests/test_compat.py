"""The private torch APIs behind dist_train.compat still do what the code relies on (checked against plain torch)."""

from __future__ import annotations

import torch
from torch import nn

from dist_train import compat
from dist_train.train.sharded import SafeMetadataReader


def test_flatten_and_unflatten_round_trip_same_dtype_buffers():
    tensors = [torch.arange(6.0).view(2, 3), torch.tensor([7.0]), torch.zeros(2, 2)]
    flat = compat.flatten(tensors)
    assert flat.shape == (11,) and torch.equal(flat[:6], torch.arange(6.0))
    back = compat.unflatten(flat, tensors)
    assert all(torch.equal(a, b) and a.shape == b.shape for a, b in zip(tensors, back))


def test_every_tensor_of_a_dcp_checkpoint_loads_without_knowing_its_keys(tmp_path):
    import torch.distributed.checkpoint as dcp

    state = {"model": {"w": torch.randn(3, 4), "b": torch.randn(4)}}
    dcp.save(state, checkpoint_id=str(tmp_path), no_dist=True)
    loaded = compat.load_dcp_everything(SafeMetadataReader(str(tmp_path)))
    assert set(loaded["model"]) == {"w", "b"}
    assert all(torch.equal(loaded["model"][key], value) for key, value in state["model"].items())


def test_a_compiled_module_unwraps_to_the_module_it_wraps():
    module = nn.Linear(2, 2)
    assert compat.unwrap_compiled(torch.compile(module)) is module
    assert compat.unwrap_compiled(module) is module


def test_batchnorm_of_every_rank_is_recognised_and_nothing_else():
    norms = [nn.BatchNorm1d(3), nn.BatchNorm2d(3), nn.BatchNorm3d(3), nn.SyncBatchNorm(3)]
    assert all(compat.is_batchnorm(norm) for norm in norms)
    assert not any(compat.is_batchnorm(m) for m in (nn.LayerNorm(3), nn.GroupNorm(1, 3), nn.Linear(3, 3)))


def test_shared_empty_is_allocated_in_shared_memory_as_asked():
    """What `Decoder.collate` writes a worker's float batch into: shared from the start, so sending it is a handle."""
    tensor = compat.shared_empty((2, 3, 4, 5), torch.float32)
    assert tensor.is_shared() and tensor.is_contiguous()
    assert tensor.shape == (2, 3, 4, 5) and tensor.dtype == torch.float32
    tensor.fill_(1.5)
    assert float(tensor.sum()) == 1.5 * 120
