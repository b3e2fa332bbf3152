"""Evaluate a saved model on any labelled set with the official AIROGS metrics.

    python launch/evaluate.py --model runs/demo --shards 'data/shards/synthetic/val-*.tar' --out eval/
    python launch/evaluate.py --model model.safetensors --images DIR --labels labels.csv --out eval/
    python launch/evaluate.py --model runs/fold0 --model runs/fold1 --shards 'data/shards/x/val-*.tar' --out eval/

Writes report.json (alpha, beta, AUC with bootstrap 95% intervals, the confusion matrix at the
export's threshold, the images skipped), roc.png and predictions.csv, whose columns are
id,label,likelihood,referable_glaucoma,error. --labels is read as shards/build.py reads it
(challenge_id,class with RG/NRG or 1/0); an image is labelled by its file name without extension.
Exit codes: 0 every image scored; 1 no metric (the scored images hold one class only) or a shard
unreadable; 2 bad input, nothing written; 3 finished, some images unreadable (named on stderr and in
the CSV's error column).
Several --model are averaged (the mean of their probabilities, each with its own preprocessing and
TTA); the ensemble's threshold is then chosen on this labelled set by the rule each export's threshold
follows (specificity >= 95%, the β point) and written with the members to ensemble.json, which
predict.py and evaluate.py take as --model. Choose it on validation data, then evaluate
--model ensemble.json on a test set. report.json names the models averaged.
"""

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from dist_train.cli_help import ArgumentParser
from dist_train.data.manifest import split_counts
from dist_train.data.preprocess import ClaheError
from dist_train.errors import DataError
from dist_train.evaluation import metrics
from dist_train.evaluation.ensemble import (
    COMBINE_RULE,
    ENSEMBLE_FILE,
    Ensemble,
    Members,
    choose_threshold,
    write_ensemble,
)
from dist_train.evaluation.inference import InputError
from dist_train.evaluation.predict_cli import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    add_common_arguments,
    check_common,
    check_models,
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
from dist_train.shards.inputs import ShardInputError, find_images, offenders, read_labels

WRITTEN = ("report.json", "roc.png", "predictions.csv")


@dataclass
class LabelledImages:
    """The images to evaluate (id -> path), their labels, and what was left out and why."""

    images: dict
    labels: dict
    skipped: dict = field(default_factory=dict)
    unlabelled_warning: str = ""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0],
                            epilog=epilog({EXIT_FAILED: "no metric (the scored images hold one class only) or a "
                                                        "shard unreadable; nothing written"}))
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--shards", help="labelled WebDataset shards, a glob or brace pattern (quote it)")
    source.add_argument("--images", type=Path, help="folder of fundus images (searched recursively); needs --labels")
    parser.add_argument("--labels", type=Path,
                        help="challenge_id,class CSV (RG/NRG or 1/0) for --images (no default: required with --images)")
    parser.add_argument("--skip-missing", action="store_true",
                        help="evaluate the images that have a row in --labels and name the others, "
                             "instead of refusing (as shards/build.py --skip-missing)")
    parser.add_argument("--out", type=Path, required=True, help="folder for report.json, roc.png, predictions.csv")
    parser.add_argument("--bootstrap", type=int, default=1000,
                        help="bootstrap resamples for the 95%% intervals, 0 for none (default: %(default)s)")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    if not 0 <= args.bootstrap <= 100_000:
        parser.error(f"--bootstrap {args.bootstrap}: give 0 (no intervals) to 100000")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        check_common(args)
        source = _checked_source(args)
        checked = check_models(args)
        check_out_folder(args.out, _written(checked), args.overwrite)
        models = load_models(checked, args)
        if isinstance(source, list):
            models.check_shards(source)
    except (InputError, ShardInputError, DataError, ClaheError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if isinstance(source, LabelledImages) and source.unlabelled_warning:
        print(source.unlabelled_warning, file=sys.stderr)
    print(models.describe())
    try:
        scores = _score(models, source, args)
    except DataError as error:
        print(f"error: {error}; nothing written", file=sys.stderr)
        return EXIT_FAILED
    report_skipped(scores)
    if len(set(scores.labels)) < 2:
        print(f"error: {counts(scores)}; the scored images hold one class only, so no metric is defined",
              file=sys.stderr)
        return EXIT_FAILED
    report = _write_outputs(args, models, scores, source)
    print(json.dumps({k: report[k] for k in ("alpha", "beta", "auc", "n", "positives")}, default=float))
    written = (*WRITTEN, ENSEMBLE_FILE) if "ensemble" in report else WRITTEN
    print(f"wrote {', '.join(written)} to {args.out}: {counts(scores)}")
    return exit_code(scores)


def _written(checked: Members) -> tuple[str, ...]:
    """The files --out receives: with several bare exports also the ensemble.json of their threshold."""
    return (*WRITTEN, ENSEMBLE_FILE) if checked.needs_threshold else WRITTEN


def _checked_source(args: argparse.Namespace):
    """Shard URLs, or the labelled images, each checked to hold both classes."""
    if args.shards:
        if args.labels:
            raise InputError(f"--labels {args.labels}: shards carry their labels; give --labels with --images only")
        urls = resolve_shards(args.shards)
        totals = split_counts(urls, "auto")
        _check_both_classes(f"--shards {args.shards}", totals.samples, totals.positives)
        return urls
    if not args.labels:
        raise InputError(f"--images {args.images}: give the labels CSV with --labels (challenge_id,class)")
    return labelled_images(args.images, args.labels, args.skip_missing)


def labelled_images(root: Path, labels_csv: Path, skip_missing: bool) -> LabelledImages:
    """Images under root paired with their CSV rows by file name, by the shard builder's reader and rules."""
    by_name = find_images([root])
    if not by_name:
        raise InputError(f"--images {root}: no .jpg, .jpeg or .png files under it")
    labels = read_labels(labels_csv)
    unlabelled = sorted(str(path) for name, path in by_name.items() if name not in labels)
    if unlabelled and not skip_missing:
        raise InputError(f"--images {root}: " + offenders(f"images have no row in --labels {labels_csv}", unlabelled)
                         + "; add their rows, or pass --skip-missing to evaluate the rest")
    kept = {_image_id(root, path): path for name, path in by_name.items() if name in labels}
    result = LabelledImages(kept, {key: labels[path.stem][0] for key, path in kept.items()},
                            {"unlabelled_images": len(unlabelled),
                             "labelled_ids_without_image": len(set(labels) - set(by_name))})
    if unlabelled:
        result.unlabelled_warning = "warning: " + offenders(
            f"images under {root} have no row in --labels {labels_csv}, not evaluated", unlabelled)
    _check_both_classes(f"--labels {labels_csv}", len(kept), sum(result.labels.values()))
    return result


def _image_id(root: Path, path: Path) -> str:
    """The image's path under --images without extension: the id predict.py writes for the same image."""
    return path.relative_to(root).with_suffix("").as_posix()


def _check_both_classes(what: str, samples: int, positives: int) -> None:
    if samples and 0 < positives < samples:
        return
    only = "RG" if positives else "NRG"
    raise InputError(f"{what}: all {samples} samples to evaluate are {only}; the metrics need both RG and NRG")


def _score(models: Ensemble, source, args: argparse.Namespace) -> Scores:
    mode = progress_mode(args.progress)
    if isinstance(source, list):
        return models.score_shards(source, split_counts(source, "auto").samples, args.batch_size, progress=mode)
    scores = models.score_images(source.images, args.batch_size, mode)
    scores.labels = [source.labels[key] for key in scores.keys]
    return scores


def _write_outputs(args: argparse.Namespace, models: Ensemble, scores: Scores, source) -> dict:
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    report = metrics.compute_all(scores.labels, scores.scores, bootstrap=args.bootstrap)
    report["models"] = models.names
    if len(models.names) > 1:
        report["combine"] = COMBINE_RULE
    threshold = models.threshold
    if threshold is not None:
        report["at_export_threshold"] = {"threshold": threshold, "source": models.threshold_source,
                                         **metrics.confusion_at(scores.labels, scores.scores, threshold)}
    elif len(models.names) > 1:
        threshold = _choose_ensemble_threshold(args, models, scores, report)
    report["rejected"] = [{"id": key, "path": where, "reason": reason} for where, key, reason in scores.bad]
    if isinstance(source, LabelledImages):
        report["skipped"] = source.skipped
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    metrics.plot_roc(scores.labels, scores.scores, out / "roc.png")
    write_predictions(out / "predictions.csv", scores, threshold)
    return report


def _choose_ensemble_threshold(args: argparse.Namespace, models: Ensemble, scores: Scores, report: dict) -> float:
    """The bare exports' own threshold, chosen on this labelled set and kept in ensemble.json for predict.py."""
    threshold = choose_threshold(scores.labels, scores.scores)
    labelled_by = f"--shards {args.shards}" if args.shards else f"--images {args.images} --labels {args.labels}"
    validation = {"set": labelled_by, **{key: report[key] for key in ("n", "positives", "alpha", "beta", "auc")}}
    report["ensemble"] = str(write_ensemble(args.out / ENSEMBLE_FILE, models, threshold, validation))
    report["ensemble_threshold"] = threshold
    return threshold


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
