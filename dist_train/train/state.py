"""The resumable parts of a run, each with torch's `Stateful` protocol (`state_dict` / `load_state_dict`).

The checkpointer takes a mapping of named parts and stores them in `trainer.json` through its one JSON
codec: the run's shared parts once (rank 0's), the per-rank parts once per rank. Adding a resumable
part (an EMA model's counters, a second stream) is one more entry in that mapping, nothing else.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from dist_train.data.stream import StreamPosition
from dist_train.train import distributed


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainerState:
    """Everything about progress that is not a tensor."""

    epoch: int = 0
    step: int = 0
    epoch_start_step: int = 0
    phase: int = -1
    best_metric: float | None = None
    best_epoch: int | None = None
    best_checkpoint: str | None = None
    best_record: dict[str, float] | None = None
    evals_without_improvement: int = 0
    epochs_without_positives: int = 0
    first_positive_epoch: int | None = None
    val_loss_history: list[float] = field(default_factory=list)
    phases_ran: list[dict[str, Any]] = field(default_factory=list)
    bad_samples: int = 0
    """The most corrupt training samples seen in one epoch."""
    seen_samples: int = 0
    wall_time_s: float = 0.0

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = {f.name for f in dataclasses.fields(self)}
        for name, value in state.items():
            if name in names:
                setattr(self, name, value)

    def rescale_epoch(self, ratio: float, steps_per_epoch: int) -> int:
        """Another world size changed the epoch's length by `ratio`: the interrupted epoch keeps the fraction
        it had done (it sees its samples once, give or take one global batch); returns the steps now done."""
        done = round((self.step - self.epoch_start_step) * ratio)
        self.epoch_start_step = self.step - min(done, steps_per_epoch)
        return done


class StreamState:
    """This rank's position in its epoch stream: what lets a run resume mid-epoch exactly."""

    def __init__(self) -> None:
        self.position = StreamPosition()

    def reset(self, micro_batches: int = 0) -> None:
        self.position = StreamPosition(micro_batches=micro_batches)

    def state_dict(self) -> dict[str, Any]:
        return self.position.to_json()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = StreamPosition.from_json(state)


class RNGState:
    """Python, numpy and torch generators of this rank (dropout masks after a mid-epoch resume)."""

    def state_dict(self) -> dict[str, Any]:
        return distributed.rng_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        distributed.set_rng_state(state)


class Stop(enum.Enum):
    HEALTH = "health"
    """A training-health rule: the run fails with advice."""
    EARLY = "early"
    """Early stopping: the run ends normally."""


@dataclass(frozen=True)
class Decision:
    """What rank 0 decided after an evaluation; broadcast so that every rank acts on the same one."""

    improved: bool = False
    stop: Stop | None = None
    reason: str | None = None
