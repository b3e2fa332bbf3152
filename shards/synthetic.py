"""Write a synthetic AIROGS-style fundus data set (JPEGs + labels.csv).

    python shards/synthetic.py --out DIR --n N [--positive-rate R] [--size S] [--seed K] [--folders K]
"""

from __future__ import annotations

import sys

from dist_train.cli_help import ArgumentParser, exit_codes
from dist_train.shards.synthetic import generate


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="shards/synthetic.py", description=__doc__,
                            epilog=exit_codes({0: "images and labels.csv written", 2: "bad input (nothing written)"}))
    parser.add_argument("--out", required=True, help="folder for <folder>/TRAIN*.jpg and labels.csv")
    parser.add_argument("--n", type=int, required=True, help="number of images")
    parser.add_argument("--positive-rate", type=float, default=0.03, help="fraction labelled RG")
    parser.add_argument("--size", type=int, default=512, help="approximate image height in pixels")
    parser.add_argument("--seed", type=int, default=0, help="random seed: the same seed writes the same images")
    parser.add_argument("--folders", type=int, default=1, help="split the images over folders 0..K-1")
    parser.add_argument("--label-noise", type=float, default=0.03,
                        help="fraction of each class drawn with the other class's cup")
    args = parser.parse_args(argv)
    try:
        labels_csv = generate(args.out, args.n, args.positive_rate, args.size, args.seed, args.folders,
                              args.label_noise)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.n} images and {labels_csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
