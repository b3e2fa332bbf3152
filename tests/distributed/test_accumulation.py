"""Gradient accumulation across real gloo ranks: 2 ranks x k=2 micro-batches = 1 process, the union batch.

BatchNorm runs in eval mode (running statistics), so the update does not depend on how the batch is split.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from dist_train.config import config_from_dict
from dist_train.model.network import build_model

from multiprocess import run_on_ranks

pytestmark = pytest.mark.slow
MICRO, WORLD, ACCUMULATION = 3, 2, 2


def _config(engine: str, accumulation: int):
    return config_from_dict({
        "data": {"train_shards": "-", "val_shards": "-"},
        "model": {"backbone": "resnet10t", "head_widths": [8], "head_dropout": [0.0]},
        "optim": {"name": "sgd", "lr": 0.5, "momentum": 0.0, "weight_decay": 0.0},
        "train": {"batch_size": MICRO, "accumulation_steps": accumulation, "device": "cpu"},
        "engine": {"kind": engine, "zero_stage": 2},
    })


def _batches():
    generator = torch.Generator().manual_seed(7)
    images = torch.randn(WORLD * ACCUMULATION * MICRO, 3, 32, 32, generator=generator)
    labels = (torch.rand(len(images), generator=generator) < 0.5).float()
    return images, labels


def _model():
    torch.manual_seed(3)
    return build_model(_config("ddp", 1).model).eval()


def _train_rank(env, engine_kind: str) -> dict[str, torch.Tensor]:
    from dist_train.model.optim import build_optimizer
    from dist_train.model.unfreeze import UnfreezeSchedule
    from dist_train.train.engine import build_engine

    cfg = _config(engine_kind, ACCUMULATION)
    model = _model()
    schedule = UnfreezeSchedule(cfg.unfreeze, model)
    engine = build_engine(model, build_optimizer(model, schedule, cfg.optim), cfg, env)
    engine.enter_phase(schedule, 0)
    for group in engine.optimizer.param_groups:
        group["lr"] = cfg.optim.lr
    images, labels = _batches()
    mine = slice(env.rank * ACCUMULATION * MICRO, (env.rank + 1) * ACCUMULATION * MICRO)
    chunks = list(zip(images[mine].split(MICRO), labels[mine].split(MICRO)))
    for index, (chunk_images, chunk_labels) in enumerate(chunks):
        engine.forward_backward(chunk_images, chunk_labels, torch.nn.BCEWithLogitsLoss(),
                                sync=index == len(chunks) - 1)
    engine.optimizer_step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _reference() -> dict[str, torch.Tensor]:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    images, labels = _batches()
    F.binary_cross_entropy_with_logits(model(images), labels).backward()
    optimizer.step()
    return model.state_dict()


@pytest.mark.parametrize("engine", ["ddp", "deepspeed"])
def test_two_ranks_with_accumulation_equal_one_union_batch(engine):
    got, expected = run_on_ranks(_train_rank, WORLD, engine)[0], _reference()
    initial = _model().state_dict()
    changed = 0
    for name, value in expected.items():
        if value.is_floating_point():
            torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=name)
            changed += not torch.equal(value, initial[name])
    assert changed > 10
