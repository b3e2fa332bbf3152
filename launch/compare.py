"""Compare runs side by side: differing config keys, best α/β/AUC, speed, world size.

    python launch/compare.py runs/b0-bce runs/b0-focal [--markdown] [--plot curves.png]
    python launch/compare.py --wandb-project airogs [--group sweep1] [--tags cpu baseline]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dist_train import report
from dist_train.cli_help import ArgumentParser, exit_codes
from dist_train.outputs import file_problem

EXIT_CODES = {0: "table printed", 1: "no wandb run matched",
              2: "bad input: not a run directory, both or neither of runs and --wandb-project, a --plot that is not "
                 "a .png one may write, wandb unavailable"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="launch/compare.py", description=__doc__, epilog=exit_codes(EXIT_CODES))
    parser.add_argument("runs", nargs="*", type=Path, help="run directories (runs/<name>)")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table instead of plain text")
    parser.add_argument("--plot", type=Path, help="write val α and train loss per epoch to this PNG (default: no plot)")
    parser.add_argument("--wandb-project", help="compare the runs of this wandb project, entity/project "
                                                "(default: the run directories given)")
    parser.add_argument("--group", help="with --wandb-project: only this group (default: every group)")
    parser.add_argument("--tags", nargs="+", help="with --wandb-project: runs carrying any of these tags "
                                                  "(default: any tags)")
    args = parser.parse_args(argv)
    if bool(args.runs) == bool(args.wandb_project):
        parser.error("give run directories or --wandb-project, not both or neither")
    missing = report.not_run_dirs(args.runs)
    if missing:
        parser.error(f"not a run directory (none of {', '.join(report.RUN_FILES)}): {', '.join(missing)}")
    problem = args.plot and file_problem("--plot", args.plot, (".png",), "curves.png")
    if problem:
        parser.error(problem)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.wandb_project:
        try:
            runs = report.load_wandb_runs(args.wandb_project, args.group, args.tags)
        except report.WandbUnavailable as error:
            print(f"compare: {error}", file=sys.stderr)
            return 2
    else:
        runs = [report.load_run(run_dir) for run_dir in args.runs]
    if not runs:
        print("compare: no runs matched", file=sys.stderr)
        return 1
    print(report.format_text(report.compare_rows(runs), [run.name for run in runs], markdown=args.markdown))
    if args.plot:
        print(report.plot_comparison(runs, args.plot), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
