"""What rank 0 decides after an evaluation: a pure function of the run's progress and the evaluation's record.

Every rank acts on the returned `Decision` (the loop broadcasts it), so the rules live here once.
"""

from __future__ import annotations

from typing import Any

from dist_train.config import Config
from dist_train.train.health import no_positives_message, starved_of_positives
from dist_train.train.state import Decision, Stop, TrainerState


def decide(state: TrainerState, cfg: Config, epoch: int, train_predicted_positives: int,
           record: dict[str, Any]) -> Decision:
    """Record the best evaluation, count evaluations without improvement, then apply the health rule
    (the run fails with advice) and early stopping (the run ends), in that order. Updates `state`."""
    value = record[cfg.eval.metric]
    improved = value == value and (state.best_metric is None or value > state.best_metric)
    if improved:
        state.best_metric, state.best_epoch, state.evals_without_improvement = value, epoch, 0
        state.best_record = {name: record[name] for name in ("alpha", "beta", "auc", "beta_threshold")}
    else:
        state.evals_without_improvement += 1
    predicted = train_predicted_positives > 0
    if predicted and state.first_positive_epoch is None:
        state.first_positive_epoch = epoch
    state.epochs_without_positives = 0 if predicted else state.epochs_without_positives + 1
    limit = cfg.health.max_epochs_without_positives
    if limit is not None and starved_of_positives(state.epochs_without_positives, limit):
        return Decision(improved, Stop.HEALTH, no_positives_message(state.epochs_without_positives, limit))
    if patience_spent(state, cfg):
        return Decision(improved, Stop.EARLY,
                        f"{cfg.eval.metric} did not improve for {cfg.eval.early_stopping_patience} evaluations")
    return Decision(improved)


def patience_spent(state: TrainerState, cfg: Config) -> bool:
    """The early-stopping rule: as many evaluations without improvement as `eval.early_stopping_patience`."""
    patience = cfg.eval.early_stopping_patience
    return patience is not None and state.evals_without_improvement >= patience
