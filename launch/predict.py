"""Score fundus images with an exported model: one CSV row per image.

    python launch/predict.py --model runs/demo/export/model.safetensors --images DIR --out predictions.csv
    python launch/predict.py --model runs/demo --shards 'data/shards/x/val-*.tar' --out predictions.csv

CSV columns: id,label,likelihood,referable_glaucoma,error. id is the image's path under --images
without extension (a shard's sample key for --shards); label is empty; referable_glaucoma is 1/0 at the
export's threshold. An unreadable image is skipped: named on stderr, a row with an empty likelihood and
the reason in error. Preprocessing (crop, resize, CLAHE), TTA and the threshold come from the export.
Exit codes: 0 every image scored; 1 a shard unreadable; 2 bad input, nothing written; 3 some images skipped.
"""

import argparse
import sys
from pathlib import Path

from dist_train.cli_help import ArgumentParser
from dist_train.data.manifest import split_counts
from dist_train.errors import DataError
from dist_train.evaluation.inference import InputError, Predictor, list_images
from dist_train.evaluation.predict_cli import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    add_common_arguments,
    check_common,
    check_out_file,
    counts,
    epilog,
    exit_code,
    load_predictor,
    progress_mode,
    report_skipped,
    resolve_shards,
)
from dist_train.evaluation.scoring import Scores, write_predictions


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0],
                            epilog=epilog({EXIT_FAILED: "a shard could not be read at all, nothing written"}))
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", type=Path, help="folder of fundus images (.jpg/.jpeg/.png, searched recursively)")
    source.add_argument("--shards", help="WebDataset shards, a glob or brace pattern (quote it)")
    parser.add_argument("--out", type=Path, required=True, help="the CSV to write")
    add_common_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        check_common(args)
        check_out_file(args.out, args.overwrite)
        source = resolve_shards(args.shards) if args.shards else list_images(args.images)
        predictor = load_predictor(args)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        scores = _score(predictor, source, args)
    except DataError as error:
        print(f"error: {error}; nothing written", file=sys.stderr)
        return EXIT_FAILED
    report_skipped(scores)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_predictions(args.out, scores, predictor.meta.get("threshold"), labelled=False)
    print(f"wrote {len(scores.keys) + len(scores.bad)} rows to {args.out}: {counts(scores)}")
    return exit_code(scores)


def _score(predictor: Predictor, source: list[str] | dict[str, Path], args: argparse.Namespace) -> Scores:
    mode = progress_mode(args.progress)
    if isinstance(source, list):
        return predictor.score_shards(source, split_counts(source, "auto").samples, args.batch_size, progress=mode)
    return predictor.score_images(source, args.batch_size, mode)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
