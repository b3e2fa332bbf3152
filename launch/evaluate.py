"""Evaluate a saved model on any labelled set with the official AIROGS metrics.

    python launch/evaluate.py --model runs/demo --shards 'data/shards/synthetic/val-*.tar' --out eval/
    python launch/evaluate.py --model model.safetensors --images DIR --labels labels.csv --out eval/

Writes report.json (alpha, beta, AUC with bootstrap 95% intervals, the confusion matrix at the
export's threshold), roc.png and predictions.csv.
"""

import argparse
import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dist_train import metrics  # noqa: E402
from dist_train.evaluate import write_predictions  # noqa: E402
from dist_train.inference import Predictor  # noqa: E402

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--shards")
    parser.add_argument("--images", type=Path)
    parser.add_argument("--labels", type=Path, help="challenge_id,class CSV (RG/NRG) for --images")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if bool(args.shards) == bool(args.images) or (args.images and not args.labels):
        print("error: give --shards URL, or --images DIR with --labels CSV", file=sys.stderr)
        return 2
    predictor = Predictor.load(args.model, args.device)
    scores = predictor.score_shards(args.shards) if args.shards else _score_folder(predictor, args)
    args.out.mkdir(parents=True, exist_ok=True)
    report = metrics.compute_all(scores.labels, scores.scores, bootstrap=args.bootstrap)
    threshold = predictor.meta.get("threshold")
    if threshold is not None:
        report["at_export_threshold"] = {"threshold": threshold,
                                         **metrics.confusion_at(scores.labels, scores.scores, threshold)}
    (args.out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    metrics.plot_roc(scores.labels, scores.scores, args.out / "roc.png")
    write_predictions(args.out / "predictions.csv", scores)
    print(json.dumps({k: report[k] for k in ("alpha", "beta", "auc", "n", "positives")}, default=float))
    return 0


def _score_folder(predictor: Predictor, args):
    labels = {}
    with open(args.labels, newline="") as handle:
        for row in csv.DictReader(handle):
            labels[row["challenge_id"]] = 1 if row["class"].strip().upper() == "RG" else 0
    paths = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.stem in labels)
    pre = predictor.meta["preprocess"]
    scores = predictor.score_images(paths, pre.get("shard_size") or 512, pre.get("shard_quality") or 95)
    scores.labels = [labels[key] for key in scores.keys]
    return scores


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
