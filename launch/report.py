"""Write one self-contained HTML report for one or more run directories.

    python launch/report.py runs/b0-bce runs/b0-focal --out report.html
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dist_train.cli_help import ArgumentParser, exit_codes
from dist_train.report import RUN_FILES, not_run_dirs, write_report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="launch/report.py", description=__doc__, epilog=exit_codes(
        {0: "report written", 2: "bad input: not a run directory, or --out is a folder (nothing written)"}))
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (runs/<name>)")
    parser.add_argument("--out", type=Path, default=Path("report.html"),
                        help="HTML file to write (replaced if it exists; its folder is created)")
    args = parser.parse_args(argv)
    missing = not_run_dirs(args.runs)
    if missing:
        parser.error(f"not a run directory (none of {', '.join(RUN_FILES)}): {', '.join(missing)}")
    if args.out.is_dir():
        parser.error(f"--out {args.out} is a folder: give the HTML file to write, e.g. {args.out / 'report.html'}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(write_report(args.runs, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
