"""DeepSpeed unfreezing takes the same first steps as DDP: the oracle is the DDP run of the same seeds.

Under DeepSpeed a frozen parameter stays registered and is gated (zero gradient, LR 0), so without a
reset Adam's step counter runs while its moments stay zero, and the bias correction is gone when the
parameter starts training. Under DDP it has no gradient and no state until its first real step. The
update norm of the parameters that start training in phase 1, step by step after the unfreeze, must
agree within 1%; so must the head's during phase 0 (ZeRO 1-2 build their optimizer state at init).
The same comparison catches DeepSpeed's default gradient clipping at 1.0, which DDP does not apply.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dist_train.data.stream import TrainStream, make_loader
from dist_train.train.loop import Trainer

from multiprocess import run_on_ranks
from run_helpers import tiny_config as tiny

pytestmark = pytest.mark.slow
PHASES = "unfreeze.phases=[{from_epoch: 0, train: head}, {from_epoch: 1, train: last_1_blocks, lr: 0.01}]"
STEPS_PER_EPOCH = 10
DEEPSPEED_STAGES = (0, 2)


class UpdateNorms:
    """The norm of each optimizer step's change to a set of parameters, from a snapshot before each batch."""

    def __init__(self, parameters: list[torch.nn.Parameter]):
        self.parameters, self.norms = parameters, []
        self.previous = self._flat()

    def _flat(self) -> torch.Tensor:
        return torch.cat([param.detach().double().flatten() for param in self.parameters])

    def take(self) -> None:
        current = self._flat()
        self.norms.append(float(torch.linalg.vector_norm(current - self.previous)))
        self.previous = current


def _run(env, shards, run_root: Path, engine: str, stage: int) -> dict[str, list[float]]:
    """Two epochs (head, then the last block too) at accumulation 1; per-step update norms of both sets."""
    cfg = tiny(shards, run_root, f"engine.kind={engine}", f"engine.zero_stage={stage}", PHASES, "optim.name=adamw",
               "optim.weight_decay=0.05", f"train.steps_per_epoch={STEPS_PER_EPOCH}", "train.batch_size=4",
               "train.epochs=2")
    recorders: dict[str, UpdateNorms] = {}

    def loader(dataset, *args):
        for batch in make_loader(dataset, *args):
            if isinstance(dataset, TrainStream) and batch.keys:
                for recorder in recorders.values():
                    recorder.take()
            yield batch

    trainer = Trainer(cfg, env, loader_factory=loader)
    schedule, named = trainer.unfreeze, dict(trainer.engine.module.named_parameters())
    head, unfrozen = schedule.phase_trainable[0], schedule.phase_trainable[1] - schedule.phase_trainable[0]
    recorders.update(head=UpdateNorms([named[name] for name in sorted(head)]),
                     unfrozen=UpdateNorms([named[name] for name in sorted(unfrozen)]))
    trainer.train()
    for recorder in recorders.values():
        recorder.take()
    return {name: recorder.norms[1:] for name, recorder in recorders.items()}


def _deepspeed_runs(env, shards, run_root: Path) -> dict[int, dict[str, list[float]]]:
    """Both stages in one process: importing DeepSpeed costs more than a run."""
    return {stage: _run(env, shards, run_root / f"zero{stage}", "deepspeed", stage) for stage in DEEPSPEED_STAGES}


def _relative_gaps(got: list[float], expected: list[float]) -> list[float]:
    return [abs(a - b) / b for a, b in zip(got, expected)]


def test_deepspeed_updates_after_an_unfreeze_match_ddp(make_shards, tmp_path):
    shards = make_shards(train=[20, 20])
    (ddp,) = run_on_ranks(_run, 1, shards, tmp_path / "ddp", "ddp", 0)
    (deepspeed,) = run_on_ranks(_deepspeed_runs, 1, shards, tmp_path, spawn=True)
    assert len(ddp["head"]) == 2 * STEPS_PER_EPOCH
    assert all(norm == 0 for norm in ddp["unfrozen"][:STEPS_PER_EPOCH]), "the oracle's backbone moved while frozen"
    assert all(norm > 0 for norm in ddp["unfrozen"][STEPS_PER_EPOCH:])
    for stage, norms in deepspeed.items():
        assert all(norm == 0 for norm in norms["unfrozen"][:STEPS_PER_EPOCH]), f"ZeRO-{stage}: moved while frozen"
        phase0 = _relative_gaps(norms["head"][:STEPS_PER_EPOCH], ddp["head"][:STEPS_PER_EPOCH])
        assert max(phase0) < 0.01, f"ZeRO-{stage}: head updates in phase 0 differ from DDP's by {phase0}"
        phase1 = _relative_gaps(norms["unfrozen"][STEPS_PER_EPOCH:], ddp["unfrozen"][STEPS_PER_EPOCH:])
        assert max(phase1) < 0.01, f"ZeRO-{stage}: updates after the unfreeze differ from DDP's by {phase1}"
