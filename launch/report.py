"""Write one self-contained HTML report for one or more run directories.

    python launch/report.py runs/b0-bce runs/b0-focal --out report.html
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dist_train.report import write_report  # noqa: E402  (runs from a checkout without installing)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (runs/<name>)")
    parser.add_argument("--out", type=Path, default=Path("report.html"), help="HTML file to write")
    args = parser.parse_args(argv)
    missing = [str(run) for run in args.runs if not run.is_dir()]
    if missing:
        parser.error(f"not a run directory: {', '.join(missing)}")
    print(write_report(args.runs, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
