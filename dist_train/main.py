"""The entry every launcher ends in: parse, validate, start the process group, train, clean up.

`launch/train.py` (torchrun), `launch/submit.py` (submitit/SLURM) and `python -m dist_train.main` all
call `main(argv)` and take --config/--set/--resume from `add_run_arguments`, so the options mean the same
everywhere. The config is validated before any process group starts or any file is written.
Exit codes: 0 done (or preempted and checkpointed), 1 training failed, 2 bad input.

torch is imported inside the functions that need it: submit.py builds its parser from this module and
should not pay for torch to print its --help.
"""

from __future__ import annotations

import argparse
import faulthandler
import fcntl
import logging
import os
import sys
import tarfile
import warnings
from pathlib import Path
from typing import IO, TYPE_CHECKING

from dist_train.cli_help import ArgumentParser, exit_codes
from dist_train.config import Config, ConfigError, blame_override, load_config, save_config
from dist_train.errors import DistTrainError, LaunchError, RunLocked, RunRefused, WeightsError, one_line, say
from dist_train.summary import format_summary
from dist_train.train import preemption
from dist_train.train.resume_check import (
    ResumeRefused,
    check_resume,
    has_history,
    move_aside,
    set_aside_history_without_checkpoint,
)

if TYPE_CHECKING:
    from dist_train.train.distributed import DistEnv

log = logging.getLogger("dist_train")

DCP_SINGLE_PROCESS_WARNING = r"torch\.distributed is disabled, unavailable or uninitialized, assuming the intent is to"
"""DCP's UserWarning at every save and load of a one-process run, which is what a one-process run intends."""


# ------------------------------------------------------------------ command line


def add_run_arguments(parser: argparse.ArgumentParser, resume: bool = True) -> None:
    """--config, --set and (unless the launcher decides it) --resume, defined once for every command.

    `--set` extends: `--set a=1 --set b=2` applies both, in order, as one `--set a=1 b=2` would.
    """
    parser.add_argument("--config", metavar="YAML", help="preset (configs/*.yaml); default: the built-in defaults")
    parser.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                        help="dotted overrides, e.g. train.epochs=3; repeat --set freely, all are applied in "
                             "order (default: none)")
    if resume:
        parser.add_argument("--resume", metavar="auto|none|PATH",
                            help="auto: the run's latest checkpoint, if any; none: start afresh (an earlier run "
                                 "in the run directory is moved aside to <run_dir>.<timestamp>); PATH: a "
                                 "checkpoint folder or run directory (default: checkpoint.resume of the config, "
                                 "auto unless set)")


EXIT_CODES = {0: "trained to the end, or preempted and checkpointed (rerun with --resume auto to continue)",
              1: "training failed (a rank died, a non-finite loss, a health rule, a checkpoint write)",
              2: "bad input: config, option, shards, weights, a run directory in use, or a resume the "
                 "checkpoint cannot take"}


def build_parser(prog: str = "python -m dist_train.main") -> ArgumentParser:
    parser = ArgumentParser(prog=prog, description=__doc__.splitlines()[0], epilog=exit_codes(EXIT_CODES))
    add_run_arguments(parser)
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def run_argv(args: argparse.Namespace) -> list[str]:
    """The argv that gives `main` the same --config/--set/--resume as `args` (for the ranks torchrun starts)."""
    argv = ["--config", args.config] if args.config else []
    argv += ["--resume", args.resume] if args.resume else []
    return argv + (["--set", *args.set] if args.set else [])


# ------------------------------------------------------------------ the run


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, args.set)
        preflight(cfg, args.config or "<defaults>", args.set)
    except ConfigError as error:
        say(f"config error: {error}")
        return 2
    under_launcher = preemption.installed()  # submitit's TrainingJob installed them and requeues on Preempted
    if not under_launcher:
        preemption.install_handlers()  # before any DataLoader worker forks: workers inherit and ignore them
    from dist_train.train import distributed

    if not faulthandler.is_enabled() and sys.__stderr__ is not None:
        faulthandler.enable(sys.__stderr__)  # a rank that dies of a signal (a C++ abort) says where, in its log
    try:
        env = distributed.init_distributed(cfg.train.device, cfg.engine.timeout_s,
                                           always=cfg.engine.kind == "deepspeed")
    except LaunchError as error:
        say(f"error: {error}")
        return error.exit_code
    _setup_logging(env)
    try:
        return _run(cfg, env, args.resume or cfg.checkpoint.resume, reraise_preempted=under_launcher)
    finally:
        distributed.destroy()


def preflight(cfg: Config, source: str, overrides: list[str]) -> None:
    """What can be checked before any process starts or any file is written: shards exist, backbone exists."""
    try:
        _preflight(cfg, source)
    except ConfigError as error:
        raise blame_override(error, overrides) from None


TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
"""A shard named so is left to the run to read (and to report if it cannot); another file is checked here."""


def _preflight(cfg: Config, source: str) -> None:
    from dist_train.data.stream import DataError, shard_urls
    from dist_train.model.network import check_backbone_name, check_pretrained
    from dist_train.model.optim import LayerDecayError, check_layer_decay
    from dist_train.train.engine.zero_config import check_deepspeed_file

    for key in ("train_shards", "val_shards"):
        pattern = getattr(cfg.data, key)
        try:
            urls = shard_urls(pattern)
        except DataError as error:
            raise ConfigError(source, f"data.{key}", str(error)) from None
        local = [url for url in urls if "://" not in url and not url.startswith("pipe:")]
        missing = [url for url in local if not Path(url).is_file()]
        if missing:
            raise ConfigError(source, f"data.{key}", f"{len(missing)} shard(s) not found, e.g. {missing[0]}")
        if local and not local[0].endswith(TAR_SUFFIXES) and not tarfile.is_tarfile(local[0]):  # e.g. labels.csv
            raise ConfigError(source, f"data.{key}", f"{local[0]} is not a tar shard: give the .tar files "
                                                     f"shards/build.py wrote, e.g. DIR/{key.split('_')[0]}-*.tar")
    try:
        check_backbone_name(cfg.model.backbone)
    except ValueError as error:
        raise ConfigError(source, "model.backbone", str(error).removeprefix("model.backbone: ")) from None
    try:
        check_pretrained(cfg.model.pretrained, cfg.model, cfg.data.image_size)
    except WeightsError as error:
        raise ConfigError(source, "model.pretrained", str(error).removeprefix("model.pretrained: ")) from None
    try:
        check_layer_decay(cfg.model.backbone, cfg.optim.layer_decay)
    except LayerDecayError as error:
        raise ConfigError(source, "optim.layer_decay", str(error).removeprefix("optim.layer_decay: ")) from None
    check_deepspeed_file(cfg, source)
    _refuse_unfinished_builds(cfg, source)
    _refuse_clahe_conflicts(cfg, source)
    _refuse_one_class_training(cfg, source)


def _refuse_one_class_training(cfg: Config, source: str) -> None:
    """Training shards whose manifest counts no referable (or no non-referable) sample: every epoch would be
    spent learning a constant. Only the manifest is read here; shards without one are counted by the run."""
    from dist_train.data.manifest import manifest_counts
    from dist_train.data.stream import DataError, shard_urls

    try:
        counts = manifest_counts(shard_urls(cfg.data.train_shards), cfg.data.manifest)
    except DataError:  # a data.manifest that does not exist: the run says so where it reads the counts
        return
    if counts is None or 0 < counts.positives < counts.samples:
        return
    missing = "referable (RG, label 1)" if counts.positives == 0 else "non-referable (NRG, label 0)"
    raise ConfigError(source, "data.train_shards", f"its manifest counts no {missing} sample among "
                                                   f"{counts.samples}, so there is nothing to learn: check the class "
                                                   f"column of the labels CSV the shards were built from")


def _refuse_clahe_conflicts(cfg: Config, source: str) -> None:
    """CLAHE applied twice (data.clahe on shards built with --clahe) or on one split only: refused here."""
    from dist_train.data.preprocess import ClaheError, clahe_plan
    from dist_train.data.stream import shard_urls

    try:
        clahe_plan(cfg.data, shard_urls(cfg.data.train_shards), shard_urls(cfg.data.val_shards))
    except ClaheError as error:
        raise ConfigError(source, "data.clahe", str(error)) from None


def _refuse_unfinished_builds(cfg: Config, source: str) -> None:
    """A shard folder whose build stopped midway holds tars without a manifest: not a shard set to train on."""
    from dist_train.shards.verify import unfinished_build

    for key in ("train_shards", "val_shards"):
        folder = Path(getattr(cfg.data, key)).parent
        why = unfinished_build(folder) if folder.is_dir() else None
        if why:
            raise ConfigError(source, f"data.{key}", f"{folder}: {why}")


def _run(cfg: Config, env: DistEnv, resume: str, reraise_preempted: bool) -> int:
    from dist_train.train import checkpoint
    from dist_train.train.loop import Trainer

    lock = None
    try:
        lock, refusal, allowed = _claim_on_main(cfg, env, resume)
        if refusal:  # every rank learns it, so none is left waiting in a collective
            raise RunRefused(refusal)
        resume_from = checkpoint.resolve_resume(resume, cfg.run_dir)
        trainer = Trainer(cfg, env, resume_from, config_changes=allowed)
        summary = trainer.train()
        if env.is_main:
            print(format_summary(summary, cfg))
        return 0
    except preemption.Preempted as notice:
        if reraise_preempted:
            log.warning("preempted: %s", notice)
            raise
        if env.is_main:
            say(preempted_line(notice, cfg.run_dir))
        return 0
    except DistTrainError as error:
        say(f"error: {one_line(error)}")
        return error.exit_code
    finally:
        if lock is not None:
            lock.close()


def preempted_line(notice: BaseException, run_dir: Path) -> str:
    """What a preempted run that is not requeued by submitit tells the person who reruns it."""
    latest = run_dir / "checkpoints" / "latest"
    where = run_dir / "checkpoints" / latest.read_text().strip() if latest.is_file() else run_dir
    return f"preempted: {notice} ({where}); rerun with --resume auto to continue from it"


# ------------------------------------------------------------------ the run directory


def _claim_on_main(cfg: Config, env: DistEnv, resume: str) -> tuple[IO[str] | None, str | None, list[str]]:
    """Rank 0 checks the resume against the checkpoint's config, takes the run directory's lock, moves an
    earlier run aside for a fresh start and saves the config, in that order, so a refusal changes
    nothing; every rank gets the verdict (refusal, allowed config changes)."""
    from dist_train.train import distributed

    verdict: tuple[str | None, list[str]]
    lock, verdict = None, (None, [])
    if env.is_main:
        try:
            allowed = _check_resume(cfg, resume)
            lock = _lock_run_dir(cfg.run_dir)
            if resume == "none" and has_history(cfg.run_dir):
                lock = _start_afresh(cfg.run_dir, lock)
            elif resume == "auto":
                _set_aside_history(cfg.run_dir)
            save_config(cfg, cfg.run_dir / "config.yaml")
            verdict = (None, allowed)
        except (RunLocked, ResumeRefused) as error:
            verdict = (str(error), [])
        except OSError as error:  # e.g. flock unsupported on the file system, an unwritable run directory
            verdict = (f"cannot prepare run directory {cfg.run_dir}: {error.strerror or error}; choose another "
                       f"run_root or fix its permissions", [])
    refusal, allowed = distributed.broadcast_object(env, verdict)
    return lock, refusal, allowed


def _check_resume(cfg: Config, resume: str) -> list[str]:
    """The config changes a resume carries, logged; ResumeRefused when the checkpoint cannot take them."""
    folder, allowed = check_resume(cfg, resume)
    if allowed:
        log.warning("resuming %s with %d changed setting(s): %s", folder, len(allowed), "; ".join(allowed))
    return allowed


def _start_afresh(run_dir: Path, lock: IO[str]) -> IO[str]:
    """--resume none on a directory with a history: the old run moves aside, whole, and this run starts in
    a new, empty directory of the same name (locked before the old lock is let go)."""
    moved = move_aside(run_dir)
    fresh = _lock_run_dir(run_dir)
    lock.close()
    log.warning("--resume none: moved the earlier run in %s aside to %s; this run starts afresh", run_dir, moved)
    return fresh


def _set_aside_history(run_dir: Path) -> None:
    moved = set_aside_history_without_checkpoint(run_dir)
    if moved is not None:
        log.warning("--resume auto: no checkpoint in %s to resume; this run starts at step 0 and the earlier "
                    "attempt's history moved to %s", run_dir, moved)


def _lock_run_dir(run_dir: Path) -> IO[str]:
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


def _setup_logging(env: DistEnv) -> None:
    level = logging.INFO if env.is_main else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s [rank {env.rank}] %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr, force=True)
    for noisy in ("PIL", "matplotlib", "urllib3", "DeepSpeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=DCP_SINGLE_PROCESS_WARNING, category=UserWarning)


if __name__ == "__main__":
    sys.exit(main())
