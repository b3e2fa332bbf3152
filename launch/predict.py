"""Score fundus images with an exported model: one CSV row per image (id, likelihood, decision).

    python launch/predict.py --model runs/demo/export/model.safetensors --images DIR --out predictions.csv
    python launch/predict.py --model runs/demo --shards 'data/shards/x/val-*.tar' --out predictions.csv

Preprocessing (crop, resize, CLAHE), TTA and the decision threshold come from the export.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dist_train.inference import Predictor, write_prediction_csv  # noqa: E402

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="model.safetensors or a run directory")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", type=Path, help="folder of fundus images (searched recursively)")
    source.add_argument("--shards", help="WebDataset URL of shards")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    try:
        predictor = Predictor.load(args.model, args.device)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.shards:
        scores = predictor.score_shards(args.shards, args.batch_size)
    else:
        paths = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            print(f"error: no images under {args.images}", file=sys.stderr)
            return 2
        pre = predictor.meta["preprocess"]
        scores = predictor.score_images(paths, pre.get("shard_size") or 512, pre.get("shard_quality") or 95,
                                        args.batch_size)
    write_prediction_csv(args.out, scores, predictor.meta.get("threshold"))
    print(f"wrote {len(scores.keys)} predictions to {args.out}")
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
