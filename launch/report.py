"""Write one self-contained HTML report for one or more run directories.

    python launch/report.py runs/b0-bce runs/b0-focal --out report.html
    python launch/report.py runs/demo --cams 5 --out demo.html   # Grad-CAM of 5 cases per category

Each run with checkpoints and reachable val shards also gets Grad-CAM overlays of its most confident
true positives and worst false negatives and false positives (computed on the CPU; --cams 0 skips them).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dist_train.cli_help import ArgumentParser, exit_codes
from dist_train.outputs import file_problem
from dist_train.report import CAMS_PER_CATEGORY, RUN_FILES, not_run_dirs, write_report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="launch/report.py", description=__doc__, epilog=exit_codes(
        {0: "report written",
         2: "bad input: not a run directory, or --out is not an .html file one may write (nothing written)"}))
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (runs/<name>)")
    parser.add_argument("--out", type=Path, default=Path("report.html"),
                        help="HTML file to write (an .html replaced if it exists; its folder is created)")
    parser.add_argument("--cams", type=int, default=CAMS_PER_CATEGORY, metavar="K",
                        help="images per category (true positives, false negatives, false positives) shown with "
                             "their Grad-CAM overlay; 0 skips the maps (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.cams < 0:
        parser.error(f"--cams {args.cams}: give 0 (no maps) or more")
    missing = not_run_dirs(args.runs)
    if missing:
        parser.error(f"not a run directory (none of {', '.join(RUN_FILES)}): {', '.join(missing)}")
    problem = file_problem("--out", args.out, (".html", ".htm"), "report.html")
    if problem:
        parser.error(problem)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(write_report(args.runs, args.out, args.cams))
    return 0


if __name__ == "__main__":
    sys.exit(main())
