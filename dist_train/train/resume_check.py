"""Whether a run may resume its checkpoint under the config it is started with now, and what a fresh
start does with an old run in the same directory.

Why compare configs before anything runs: DCP loads tensors by name and shape, so a checkpoint of
another backbone or head dies deep inside `dcp.load` in a 50-line "Missing key in checkpoint
state_dict", by which time the run directory's config.yaml already describes the new run. Every
checkpoint's trainer.json holds the resolved config it was trained with; comparing the two first turns
that into one line naming the keys, and lets harmless changes (more epochs, another image size)
resume with a warning that lists them.

Why a fresh start (`--resume none`) moves the old run aside rather than into it: metrics.jsonl is
appended to, so a second history would silently interleave with the first one in every plot and
report. The old run is renamed, intact, to `<run_dir>.<timestamp>`, where compare.py and report.py
still read it.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

from dist_train.config import Config, to_dict
from dist_train.errors import UserError
from dist_train.redact import scrub_secrets

BLOCKING_KEYS = frozenset({"model.backbone", "model.head_widths", "model.head_batchnorm", "model.global_pool",
                           "model.normalize", "engine.kind", "engine.zero_stage", "optim.name"})
"""Changes a checkpoint cannot be loaded into: other tensor names or shapes, another engine layout
(DCP vs DeepSpeed, ZeRO partitioning), another optimizer's state (SGD's momentum is not Adam's moments),
other features for the same weights (another pooling or input normalisation)."""

_PHASE_TRAIN = re.compile(r"unfreeze\.phases\[\d+\]\.train")
"""The optimizer's parameter groups follow the phases that train them: another split is another state."""

IGNORED_KEYS = frozenset({"checkpoint.resume"})
"""How this run was asked to resume is not a change of the run."""

_UNSET = object()


class ResumeRefused(UserError, RuntimeError):
    """The run directory cannot be resumed (or restarted) as asked; the message says what to do instead."""


def config_changes(saved: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(blocking, allowed): every differing dotted key as `key: old -> new`, split by whether the
    checkpoint written under `saved` can still be loaded and trained on under `new`.

    A key `saved` lacks (a checkpoint from before the option existed) holds the option's default, since an
    option is added with a default that keeps what came before it: a checkpoint written before
    model.normalize resumes unless the new run asks for another normalisation."""
    old_flat, new_flat = {**_option_defaults(), **flatten(saved)}, flatten(new)
    keys = list(new_flat) + [key for key in old_flat if key not in new_flat]
    blocking: list[str]
    allowed: list[str]
    blocking, allowed = [], []
    for key in keys:
        old, now = old_flat.get(key, _UNSET), new_flat.get(key, _UNSET)
        if key in IGNORED_KEYS or old == now:
            continue
        change = f"{key}: {_show(old)} -> {_show(now)}"
        (blocking if _blocks(key, old, now, new) else allowed).append(change)
    return blocking, allowed


def _option_defaults() -> dict[str, Any]:
    """Every option's default, by dotted key; not the unfreeze phases, whose count belongs to each config."""
    return {key: value for key, value in flatten(comparable(Config())).items() if "[" not in key}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys to leaf values; a list of mappings (unfreeze.phases) is indexed, `key[0].train`."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, dotted + "."))
        elif isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
            for index, item in enumerate(value):
                flat.update(flatten(item, f"{dotted}[{index}]."))
        else:
            flat[dotted] = value
    return flat


def _blocks(key: str, old: Any, now: Any, new: dict[str, Any]) -> bool:
    if key in BLOCKING_KEYS or _PHASE_TRAIN.fullmatch(key):
        return True
    if key == "model.head_dropout":  # one more value adds a Dropout before the logit: later layers renumber
        return not (isinstance(old, list) and isinstance(now, list) and len(old) == len(now))
    if key == "optim.layer_decay":  # on/off changes the optimizer's groups; another value only their LRs
        return _is_off(old) != _is_off(now)
    return False


def _is_off(value: Any) -> bool:
    """None, or a key a checkpoint from before the option was added does not have."""
    return value is None or value is _UNSET


def _show(value: Any) -> str:
    if value is _UNSET:
        return "(unset)"
    return value if isinstance(value, str) else json.dumps(value)


def comparable(cfg: Config) -> dict[str, Any]:
    """The config as trainer.json stores it: secrets masked, then through JSON (tuples become lists)."""
    return json.loads(json.dumps(scrub_secrets(to_dict(cfg))))


def check_resume(cfg: Config, setting: str) -> tuple[Path | None, list[str]]:
    """The checkpoint `setting` resumes (None for a fresh start) and the allowed config changes it
    carries; ResumeRefused when there is no readable checkpoint there or the changes cannot load."""
    from dist_train.train import checkpoint

    try:
        folder = checkpoint.resolve_resume(setting, cfg.run_dir)
    except checkpoint.CheckpointError as error:
        raise ResumeRefused(f"{error}; name a checkpoint folder or run directory, or use --resume none") from None
    if folder is None:
        return None, []
    try:
        saved = checkpoint.read_trainer_state(folder).get("config")
    except (OSError, ValueError) as error:
        raise ResumeRefused(f"--resume {setting}: cannot read {folder / checkpoint.TRAINER_FILE} "
                            f"({type(error).__name__}: {error}); resume another checkpoint with --resume PATH, "
                            f"or start afresh with --resume none") from None
    if not isinstance(saved, dict):  # a checkpoint from before configs were stored: nothing to compare
        return folder, []
    blocking, allowed = config_changes(saved, comparable(cfg))
    if blocking:
        raise ResumeRefused(f"cannot resume {folder}: its tensors do not fit this config ({'; '.join(blocking)}). "
                            f"Start afresh with --resume none (the old run is moved aside), or give this run "
                            f"another name (--set name=NEW_NAME)")
    return folder, allowed


def has_history(run_dir: Path) -> bool:
    """A metrics history or a checkpoint: what a fresh start must neither append to nor mix with."""
    checkpoints = run_dir / "checkpoints"
    return (run_dir / "metrics.jsonl").exists() or (checkpoints.is_dir() and any(checkpoints.iterdir()))


def aside_path(path: Path, stem: str, suffix: str = "") -> Path:
    """`<stem>.<timestamp><suffix>` beside `path`, with `-2`, `-3`... after the timestamp until no file has it."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, attempt = path.with_name(f"{stem}.{stamp}{suffix}"), 1
    while target.exists():
        attempt += 1
        target = path.with_name(f"{stem}.{stamp}-{attempt}{suffix}")
    return target


def move_aside(run_dir: Path) -> Path:
    """Rename the old run, whole and untouched, to `<run_dir>.<timestamp>`; returns where it went."""
    target = aside_path(run_dir, run_dir.name)
    try:
        os.rename(run_dir, target)
    except OSError as error:
        raise ResumeRefused(f"--resume none: could not move the earlier run {run_dir} aside to {target} "
                            f"({error.strerror}); move or remove it yourself, or use another name") from None
    return target


def set_aside_history_without_checkpoint(run_dir: Path) -> Path | None:
    """--resume auto with a metrics history but no checkpoint (an attempt that ended before its first one):
    this run starts at step 0, so its records would follow that attempt's; the history moves aside whole,
    to `metrics.<timestamp>.jsonl`, which is returned (None when there was nothing to move). Only the
    history: under submitit the directory also holds this very job's logs."""
    from dist_train.train import checkpoint

    history = run_dir / "metrics.jsonl"
    if not history.is_file() or checkpoint.resolve_resume("auto", run_dir) is not None:
        return None
    moved = aside_path(history, "metrics", ".jsonl")
    os.rename(history, moved)
    return moved
