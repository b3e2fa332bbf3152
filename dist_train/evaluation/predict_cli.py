"""What launch/predict.py and launch/evaluate.py share: the same flags, checks and exit codes.

Both commands check every input before loading a model or scoring an image, so a typo costs a second,
not a run; both skip an unreadable image instead of dying on it, and say so in their exit code.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from dist_train.cli_help import exit_codes
from dist_train.data.stream import DataError, shard_urls
from dist_train.evaluation import ensemble
from dist_train.evaluation.ensemble import Ensemble, Members
from dist_train.evaluation.inference import InputError
from dist_train.evaluation.scoring import PREDICTION_COLUMNS, Scores
from dist_train.outputs import file_problem, folder_problem
from dist_train.shards.inputs import offenders

EXIT_OK, EXIT_BAD_INPUT, EXIT_FAILED, EXIT_SKIPPED = 0, 2, 1, 3
EXIT_CODES = {EXIT_OK: "every image scored", EXIT_BAD_INPUT: "bad input, nothing written",
              EXIT_SKIPPED: "finished, some images unreadable: named on stderr and in the CSV's error column"}
COLUMNS_HELP = f"CSV columns: {','.join(PREDICTION_COLUMNS)}"


def epilog(extra_codes: dict[int, str] | None = None) -> str:
    """The help text's last paragraph: every exit code of the command, then the CSV columns."""
    return f"{exit_codes({**EXIT_CODES, **(extra_codes or {})})}\n\n{COLUMNS_HELP}"


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, action="append", required=True,
                        help="model.safetensors (with its .json beside it), or a run directory holding "
                             "export/model.safetensors; repeat it to average several models (their probabilities, "
                             "each with its own preprocessing and TTA), or give the ensemble.json evaluate.py "
                             "wrote for them")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: %(default)s)")
    parser.add_argument("--progress", choices=("auto", "bar", "plain", "none"), default="auto",
                        help="progress on stderr; auto: a bar on a terminal, plain lines in a log "
                             "(default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace what an earlier run wrote to --out")


def check_common(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise InputError(f"--batch-size {args.batch_size}: give 1 or more")
    try:
        kind = torch.device(args.device).type
    except RuntimeError:
        kind = "unknown"
    if kind not in ("cpu", "cuda"):
        raise InputError(f"--device {args.device}: give cpu, cuda or cuda:N")
    if kind == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {args.device}: no CUDA device on this machine; use --device cpu")


def check_out_file(out: Path, overwrite: bool) -> None:
    """--out must be a file we may write, and not the user's earlier output unless --overwrite."""
    problem = file_problem("--out", out, (), "predictions.csv", overwrite=overwrite)
    if problem:
        raise InputError(problem)


def check_out_folder(out: Path, written: tuple[str, ...], overwrite: bool, option: str = "--out") -> None:
    """`option` must be a folder we may create or fill, holding none of `written` unless --overwrite."""
    if out.exists() and not out.is_dir():
        what = f"for {', '.join(written)}" if written else "instead"
        raise InputError(f"{option} {out}: is a file; give a folder {what}")
    present = [name for name in written if (out / name).exists()]
    if present and not overwrite:
        raise InputError(f"{option} {out}: already holds {', '.join(present)}; choose another folder or pass "
                         "--overwrite to replace them")
    problem = folder_problem(option, out, out)
    if problem:
        raise InputError(problem)


def resolve_shards(pattern: str) -> list[str]:
    """The shard files of a WebDataset pattern, every local one present."""
    try:
        urls = shard_urls(pattern)
    except DataError:
        raise InputError(f"--shards {pattern}: no shards match; check the path (and quote a pattern with *)") from None
    if Path(pattern).is_dir():
        raise InputError(f"--shards {pattern}: is a folder; give its shards as a pattern, e.g. "
                         f"'{Path(pattern) / 'val-*.tar'}' (quoted)")
    missing = [url for url in urls if "://" not in url and not url.startswith("pipe:") and not Path(url).is_file()]
    if missing:
        raise InputError(f"--shards {pattern}: " + offenders("shards missing", missing))
    return urls


def check_models(args: argparse.Namespace) -> Members:
    """The --model list resolved and checked (see ensemble.check_models), before any model loads."""
    return ensemble.check_models(args.model)


def load_models(checked: Members, args: argparse.Namespace) -> Ensemble:
    """The checked members loaded as one Ensemble (one member for a single model); a bad export is an InputError."""
    try:
        return ensemble.load_ensemble(checked, args.device)
    except (FileNotFoundError, ValueError) as error:
        raise InputError(str(error)) from None


def progress_mode(requested: str) -> str:
    """As the training loop's tracking.progress reads it: auto is a bar on a terminal, plain lines in a log."""
    if requested == "auto":
        return "bar" if sys.stderr.isatty() else "plain"
    return requested


def report_skipped(scores: Scores) -> None:
    """One stderr line per sample that could not be scored, naming its file (or shard) and why."""
    for where, key, reason in scores.bad:
        print(f"skipped {key} ({where}): {reason}", file=sys.stderr)


def exit_code(scores: Scores) -> int:
    return EXIT_SKIPPED if scores.bad else EXIT_OK


def counts(scores: Scores) -> str:
    return f"{len(scores.keys)} scored, {len(scores.bad)} skipped"
