"""Export a run (its best checkpoint) or a checkpoint folder to one safetensors file plus its JSON sidecar.

    python launch/export.py runs/demo --out runs/demo/export/model.safetensors
"""

import sys
from pathlib import Path

from dist_train.cli_help import ArgumentParser, exit_codes
from dist_train.errors import CheckpointError
from dist_train.evaluation.inference import export
from dist_train.outputs import file_problem
from dist_train.train.checkpoint import TRAINER_FILE


def main(argv: list[str]) -> int:
    codes = {0: "exported", 2: "bad input (no checkpoint, a wrong --out, an earlier export without --overwrite), "
                               "nothing written"}
    parser = ArgumentParser(description=__doc__.splitlines()[0], epilog=exit_codes(codes))
    parser.add_argument("source", type=Path,
                        help="run directory (its best, else latest checkpoint) or checkpoint folder")
    parser.add_argument("--out", type=Path,
                        help="the .safetensors to write, its .json beside it (default: "
                             "<run>/export/model.safetensors; for RUN/checkpoints/NAME, RUN/export/NAME.safetensors)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export at --out")
    args = parser.parse_args(argv)
    out = args.out or default_out(args.source)
    problem = file_problem("--out", out, (".safetensors",), "model.safetensors", overwrite=args.overwrite,
                           beside=(out.with_suffix(".json"),))
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        path = export(args.source, out)
    except (CheckpointError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"exported {path} (+ {path.with_suffix('.json').name})")
    return 0


def default_out(source: Path) -> Path:
    """<run>/export/model.safetensors for a run; for one checkpoint folder (RUN/checkpoints/NAME),
    RUN/export/NAME.safetensors: inside the checkpoint folder, retention would delete the export with it."""
    if source.parent.name == "checkpoints" and (source / TRAINER_FILE).is_file():
        return source.parent.parent / "export" / f"{source.name}.safetensors"
    return source / "export" / "model.safetensors"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
