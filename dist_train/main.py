"""The entry every launcher ends in: parse, validate, start the process group, train, clean up.

`launch/train.py` (torchrun), `launch/submit.py` (submitit/SLURM) and `python -m dist_train.main` all
call `main(argv)`. The config is validated before any process group starts or any file is written.
Exit codes: 0 done (or preempted and checkpointed), 1 training failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import sys
from pathlib import Path

from dist_train import distributed
from dist_train.config import Config, ConfigError, blame_override, load_config, save_config

log = logging.getLogger("dist_train")


class RunLocked(RuntimeError):
    """Another job is already writing this run directory."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dist_train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML preset (configs/*.yaml)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="dotted overrides")
    parser.add_argument("--resume", default=None,
                        help="auto (latest checkpoint of the run, if any), none, or a checkpoint path; "
                             "default: checkpoint.resume from the config")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, args.set)
        preflight(cfg, args.config or "<defaults>", args.set)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    env = distributed.init_distributed(cfg.train.device, cfg.engine.timeout_s, always=cfg.engine.kind == "deepspeed")
    _setup_logging(env)
    try:
        return _run(cfg, env, args.resume or cfg.checkpoint.resume)
    finally:
        distributed.destroy()


def preflight(cfg: Config, source: str, overrides: list[str]) -> None:
    """What can be checked before any process starts or any file is written: shards exist, backbone exists."""
    try:
        _preflight(cfg, source)
    except ConfigError as error:
        raise blame_override(error, overrides) from None


def _preflight(cfg: Config, source: str) -> None:
    from dist_train.data import DataError, shard_urls
    from dist_train.model import WeightsError, check_backbone_name, check_pretrained

    for key in ("train_shards", "val_shards"):
        pattern = getattr(cfg.data, key)
        try:
            urls = shard_urls(pattern)
        except DataError as error:
            raise ConfigError(source, f"data.{key}", str(error)) from None
        missing = [url for url in urls if "://" not in url and not url.startswith("pipe:") and not Path(url).is_file()]
        if missing:
            raise ConfigError(source, f"data.{key}", f"{len(missing)} shard(s) not found, e.g. {missing[0]}")
    try:
        check_backbone_name(cfg.model.backbone)
    except ValueError as error:
        raise ConfigError(source, "model.backbone", str(error).removeprefix("model.backbone: ")) from None
    try:
        check_pretrained(cfg.model.pretrained)
    except WeightsError as error:
        raise ConfigError(source, "model.pretrained", str(error).removeprefix("model.pretrained: ")) from None


def _run(cfg: Config, env: distributed.DistEnv, resume: str) -> int:
    from dist_train import checkpoint, preemption
    from dist_train.data import DataError
    from dist_train.loop import Trainer, TrainingStopped
    from dist_train.model import WeightsError

    lock = None
    try:
        lock, refusal = _lock_on_main(cfg, env)
        if refusal:  # every rank learns it, so none is left waiting in a collective
            raise RunLocked(refusal)
        resume_from = checkpoint.resolve_resume(resume, cfg.run_dir)
        trainer = Trainer(cfg, env, resume_from)
        summary = trainer.train()
        if env.is_main:
            print(format_summary(summary, cfg))
        return 0
    except preemption.Preempted as notice:
        log.warning("preempted: %s", notice)
        raise
    except (RunLocked, checkpoint.CheckpointError, DataError, TrainingStopped, WeightsError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2 if isinstance(error, (RunLocked, DataError, WeightsError)) else 1
    finally:
        if lock is not None:
            lock.close()


def _lock_on_main(cfg: Config, env: distributed.DistEnv):
    """Rank 0 takes the run directory's lock and saves the config; every rank gets the lock's verdict."""
    lock, refusal = None, None
    if env.is_main:
        try:
            lock = _lock_run_dir(cfg.run_dir)
            save_config(cfg, cfg.run_dir / "config.yaml")
        except RunLocked as error:
            refusal = str(error)
    return lock, distributed.broadcast_object(env, refusal)


def one_line(error: BaseException) -> str:
    """The message itself: a DataLoader worker re-raises with its traceback folded into the text."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    last = lines[-1] if lines else type(error).__name__
    return last.split(f"{type(error).__name__}: ", 1)[-1]


def _lock_run_dir(run_dir: Path):
    """An exclusive lock held for the life of the job, so two jobs never interleave checkpoints."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise RunLocked(f"run directory {run_dir} is in use by another job (lock {run_dir / '.lock'})") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def _setup_logging(env: distributed.DistEnv) -> None:
    level = logging.INFO if env.is_main else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s [rank {env.rank}] %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr, force=True)
    for noisy in ("PIL", "matplotlib", "urllib3", "DeepSpeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def format_summary(summary: dict, cfg: Config) -> str:
    """The table printed at the end of a run: the best evaluation's figures and where the run lives."""
    best = summary.get("best_record") or {}
    rows = [(f"best {name}", _fmt(best.get(name))) for name in ("alpha", "beta", "auc")]
    rows += [("selected by", cfg.eval.metric), ("best epoch", _fmt(summary.get("best_epoch"))),
             ("epochs done", _fmt(summary.get("epochs_done"))), ("optimizer steps", _fmt(summary.get("steps"))),
             ("first positive at epoch", _fmt(summary.get("epochs_to_first_positive"))),
             ("wall time (s)", _fmt(summary.get("wall_time_s"))), ("world size", _fmt(summary.get("world_size"))),
             ("engine", summary.get("engine")), ("run directory", summary.get("run_dir"))]
    width = max(len(name) for name, _ in rows)
    lines = ["", "run summary", "-" * (width + 30)]
    lines += [f"{name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    sys.exit(main())
