"""Score fundus images with an exported model: one CSV row per image.

    python launch/predict.py --model runs/demo/export/model.safetensors --images DIR --out predictions.csv
    python launch/predict.py --model runs/demo --shards 'data/shards/x/val-*.tar' --out predictions.csv
    python launch/predict.py --model eval/ensemble.json --images DIR --out predictions.csv

CSV columns: id,label,likelihood,referable_glaucoma,error. id is the image's path under --images
without extension (a shard's sample key for --shards); label is empty; referable_glaucoma is 1/0 at the
export's threshold. An unreadable image is skipped: named on stderr, a row with an empty likelihood and
the reason in error. Preprocessing (crop, resize, CLAHE), TTA and the threshold come from the export.
Several models (--model repeated, or the ensemble.json that evaluate.py writes for them) are averaged:
each scores with its own export's preprocessing and TTA, likelihood is the mean of their probabilities,
and the threshold is the ensemble's own (from ensemble.json, or --threshold), never one member's.
Exit codes: 0 every image scored; 1 a shard unreadable; 2 bad input, nothing written; 3 some images skipped.
"""

import argparse
import sys
from pathlib import Path

from dist_train.cli_help import ArgumentParser
from dist_train.data.manifest import split_counts
from dist_train.errors import DataError, UserError
from dist_train.evaluation.ensemble import Ensemble, Members
from dist_train.evaluation.inference import InputError, list_images
from dist_train.evaluation.predict_cli import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    add_common_arguments,
    check_common,
    check_models,
    check_out_file,
    check_out_folder,
    counts,
    epilog,
    exit_code,
    load_models,
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
    parser.add_argument("--threshold", type=float,
                        help="referable_glaucoma is likelihood >= this (0-1); default: the export's threshold, "
                             "or ensemble.json's; needed for several bare exports without an ensemble.json")
    parser.add_argument("--explain", type=Path, metavar="DIR",
                        help="also write a Grad-CAM overlay (the input beside its map) per scored image as "
                             "DIR/<id>.png; with several models, DIR/model-<k>/<id>.png per member (default: none)")
    add_common_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        check_common(args)
        check_out_file(args.out, args.overwrite)
        _check_explain(args)
        checked = check_models(args)
        _check_threshold(args, checked)
        source = resolve_shards(args.shards) if args.shards else list_images(args.images)
        models = load_models(checked, args)
        if isinstance(source, list):
            models.check_shards(source)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.threshold is not None:
        models.threshold, models.threshold_source = args.threshold, "--threshold"
    print(models.describe())
    if models.threshold is None:
        print("warning: the export has no threshold (its run never evaluated a validation set holding both classes), "
              "so referable_glaucoma stays empty: pass --threshold P to set one", file=sys.stderr)
    try:
        scores = _score(models, source, args)
    except DataError as error:
        print(f"error: {error}; nothing written", file=sys.stderr)
        return EXIT_FAILED
    report_skipped(scores)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_predictions(args.out, scores, models.threshold, labelled=False)
    print(f"wrote {len(scores.keys) + len(scores.bad)} rows to {args.out}: {counts(scores)}")
    if args.explain:
        _explain(models, source, args)
    return exit_code(scores)


def _check_explain(args: argparse.Namespace) -> None:
    """--explain DIR: a folder we may write, empty unless --overwrite (earlier overlays are not mixed in)."""
    if args.explain is None:
        return
    check_out_folder(args.explain, (), args.overwrite, "--explain")
    if args.explain.is_dir() and any(args.explain.iterdir()) and not args.overwrite:
        raise InputError(f"--explain {args.explain}: is not empty; choose another folder or pass --overwrite")


def _explain(models: Ensemble, source: list[str] | dict[str, Path], args: argparse.Namespace) -> None:
    """Overlays from each member (the maps of a mean of probabilities are not one model's to draw)."""
    from dist_train.evaluation.explain_predict import explain_images, explain_shards

    several = len(models.members) > 1
    for index, (member, name) in enumerate(zip(models.members, models.names, strict=True), 1):
        folder = args.explain / f"model-{index}" if several else args.explain
        if isinstance(source, list):
            written = explain_shards(member, source, folder, args.batch_size)
        else:
            written = explain_images(member, source, folder, args.batch_size)
        print(f"wrote {written} Grad-CAM overlays to {folder}" + (f" ({name})" if several else ""))


def _check_threshold(args: argparse.Namespace, checked: Members) -> None:
    """An ensemble's threshold must be its own: several bare exports need ensemble.json or --threshold."""
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise InputError(f"--threshold {args.threshold}: give a probability between 0 and 1")
    if checked.needs_threshold and args.threshold is None:
        raise InputError(f"--model: {len(checked.files)} models but no ensemble threshold: run launch/evaluate.py "
                         "with the same --model flags on labelled validation data, then pass --model "
                         "<its --out>/ensemble.json (or give --threshold)")


def _score(models: Ensemble, source: list[str] | dict[str, Path], args: argparse.Namespace) -> Scores:
    mode = progress_mode(args.progress)
    if isinstance(source, list):
        return models.score_shards(source, split_counts(source, "auto").samples, args.batch_size, progress=mode)
    return models.score_images(source, args.batch_size, mode)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
