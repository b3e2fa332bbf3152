"""Export a run (its best checkpoint) or a checkpoint folder to one safetensors file plus its JSON sidecar.

    python launch/export.py runs/demo --out runs/demo/export/model.safetensors
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dist_train.checkpoint import CheckpointError  # noqa: E402
from dist_train.inference import export  # noqa: E402


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="run directory or checkpoint folder")
    parser.add_argument("--out", type=Path, help="default: <run>/export/model.safetensors")
    args = parser.parse_args(argv)
    out = args.out or (args.source / "export" / "model.safetensors")
    try:
        path = export(args.source, out)
    except (CheckpointError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"exported {path} (+ {path.with_suffix('.json').name})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
