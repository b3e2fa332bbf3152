"""Train on one node: `python launch/train.py --nproc-per-node 2 --config configs/demo.yaml [--set k=v ...]`.

With --nproc-per-node > 1 (and not already under torchrun) this validates the config and the resume,
then starts torchrun on itself; each rank runs `dist_train.main.main`. Under torchrun it trains directly.

A preemption notice (SIGTERM or SIGUSR2, to the launcher, the ranks or both, as SLURM signals a job
step) makes every rank checkpoint at its next optimizer step and exit 0. torchrun is told to leave
SIGTERM to us: its own handling kills the ranks and ends non-zero even when every rank saved. So the
launcher hands a notice on to the ranks, waits for them, and exits 0 exactly when every rank did.
"""

import argparse
import contextlib
import os
import signal
import sys

from dist_train.cli_help import ArgumentParser
from dist_train.main import build_parser as build_run_parser
from dist_train.main import main, run_argv

NOTICES = (signal.SIGTERM, signal.SIGUSR2)
"""What SLURM (and a person ending a run) sends before the end; dist_train.train.preemption acts on both."""
TORCHRUN_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"
"""The signals torchrun may still treat as its death: torchrun's default list without SIGTERM."""


def build_parser() -> ArgumentParser:
    parser = build_run_parser(prog="launch/train.py")
    parser.description = __doc__.splitlines()[0]
    parser.add_argument("--nproc-per-node", type=_rank_count, default=1, metavar="N",
                        help="ranks to start on this node; more than 1 starts torchrun (default: 1, no "
                             "torchrun; ignored under torchrun, which started this rank)")
    return parser


def _rank_count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of ranks, at least 1, got {text!r}")
    return int(text)


def launch(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.nproc_per_node <= 1 or "RANK" in os.environ:
        return main(run_argv(args))
    refusal = _refusal(args)
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    return _torchrun(args.nproc_per_node, run_argv(args))


def _refusal(args: argparse.Namespace) -> str | None:
    """What rank 0 would refuse, found before torchrun starts any rank: one line, or None."""
    from dist_train.config import ConfigError, load_config
    from dist_train.main import preflight
    from dist_train.train.resume_check import ResumeRefused, check_resume

    try:
        cfg = load_config(args.config, args.set)
        preflight(cfg, args.config or "<defaults>", args.set)
        check_resume(cfg, args.resume or cfg.checkpoint.resume)
    except ConfigError as error:
        return f"config error: {error}"
    except ResumeRefused as error:
        return f"error: {error}"
    return None


def _torchrun(nproc: int, rank_argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _forward_notices()
    try:
        torchrun([*_torchrun_options(nproc), __file__, *rank_argv])
    except ChildFailedError as error:
        return _report_failures(error)
    except SignalException as error:  # a torch without --signals-to-handle: torchrun stopped the ranks itself
        print(f"error: torchrun ended the ranks on {signal.Signals(error.sigval).name}; rerun with --resume auto "
              f"to continue from the latest checkpoint", file=sys.stderr)
        return 128 + int(error.sigval)
    return 0


def _torchrun_options(nproc: int) -> list[str]:
    from torch.distributed.run import get_args_parser

    options = ["--standalone", f"--nproc-per-node={nproc}"]
    if "--signals-to-handle" in get_args_parser()._option_string_actions:  # torch >= 2.7
        options.append(f"--signals-to-handle={TORCHRUN_SIGNALS}")
    return options


def _forward_notices() -> None:
    """A notice sent to the launcher alone (`kill PID`, `scancel --batch`) reaches the ranks too; a rank
    that got it directly as well only raises the same flag twice. DataLoader workers are left alone."""
    import psutil

    def forward(signum: int, frame: object) -> None:
        for child in psutil.Process().children():
            with contextlib.suppress(psutil.Error):
                child.send_signal(signum)

    for signum in NOTICES:
        signal.signal(signum, forward)


def _report_failures(error) -> int:
    """One line per failed rank (torchrun printed the tracebacks above), and the first rank's exit code."""
    codes = []
    for rank, failure in sorted(error.failures.items()):
        code = failure.exitcode
        how = f"killed by signal {failure.signal_name()}" if code < 0 else f"exited with code {code}"
        print(f"error: rank {rank} (pid {failure.pid}) {how}", file=sys.stderr)
        codes.append(code)
    positive = [code for code in codes if code > 0]
    return positive[0] if positive else 1


if __name__ == "__main__":
    sys.exit(launch(sys.argv[1:]))
