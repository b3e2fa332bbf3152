"""Export a run (its best checkpoint) or a checkpoint folder to one safetensors file plus its JSON sidecar.

    python launch/export.py runs/demo --out runs/demo/export/model.safetensors
"""

import sys
from pathlib import Path

from dist_train.cli_help import ArgumentParser, exit_codes
from dist_train.errors import CheckpointError
from dist_train.evaluation.inference import export


def main(argv: list[str]) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0],
                            epilog=exit_codes({0: "exported",
                                               2: "bad input (no checkpoint, a wrong --out), nothing written"}))
    parser.add_argument("source", type=Path,
                        help="run directory (its best, else latest checkpoint) or checkpoint folder")
    parser.add_argument("--out", type=Path,
                        help="the .safetensors to write, its .json beside it (default: <run>/export/model.safetensors)")
    args = parser.parse_args(argv)
    out = args.out or (args.source / "export" / "model.safetensors")
    if out.is_dir() or out.suffix != ".safetensors":
        print(f"error: --out {out}: give a file name ending in .safetensors (its .json goes beside it), "
              f"e.g. {out / 'model.safetensors' if out.is_dir() else out.with_suffix('.safetensors')}", file=sys.stderr)
        return 2
    try:
        path = export(args.source, out)
    except (CheckpointError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"exported {path} (+ {path.with_suffix('.json').name})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
