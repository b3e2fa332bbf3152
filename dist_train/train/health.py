"""The users' training red flags as rules: no positive predictions, validation loss rising after an unfreeze.

Pure functions over the run's history, so each rule is tested on its own; the loop applies them on rank 0.
"""

from __future__ import annotations


def no_positives_message(epochs: int, limit: int) -> str:
    return (f"the model predicted no positive on the training data for {epochs} epochs "
            f"(health.max_epochs_without_positives={limit}): the loss or sampling starves the positive class; "
            f"try loss.name=bce with loss.pos_weight=auto, data.positive_fraction, less head dropout "
            f"or a higher optim.lr")


def starved_of_positives(epochs_without_positives: int, limit: int | None) -> bool:
    return limit is not None and epochs_without_positives >= limit


def val_loss_rising(history: list[float], rises: int) -> bool:
    """True when the last `rises` evaluations each had a higher validation loss than the one before."""
    recent = history[-(rises + 1):]
    return rises > 0 and len(recent) == rises + 1 and all(later > earlier for earlier, later in zip(recent, recent[1:]))
