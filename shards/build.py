"""Build WebDataset shards from AIROGS-style images and labels, or verify built shards.

    python shards/build.py --images DIR [DIR ...] --labels CSV --out OUT [options]
    python shards/build.py verify OUT

Re-running the same build command resumes: complete shards are kept, the rest rebuilt.
Exit codes: 0 ok, 1 too many unreadable images or a failed or unfinished verify, 2 bad input.
"""

from __future__ import annotations

import argparse
import sys

from dist_train.cli_help import ArgumentParser, exit_codes
from dist_train.data.preprocess import Clahe, parse_clahe
from dist_train.shards.build import MAX_ASPECT_RATIO, PRESET_SHARD_SIZES, BuildOptions, TooManyRejectedError, build
from dist_train.shards.inputs import ShardInputError
from dist_train.shards.verify import UnfinishedBuildError, verify

BUILD_EXIT_CODES = exit_codes({0: "built (or resumed to the end)",
                               1: "more unreadable images than --max-rejected-fraction allows",
                               2: "bad input, caught before any shard is written"})
VERIFY_EXIT_CODES = exit_codes({0: "every shard matches the manifest",
                                1: "a shard differs or is missing, or the build did not finish",
                                2: "not a shard folder built by shards/build.py"})


def parse_build_args(argv: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(
        description="Preprocess fundus images into train/val WebDataset shards. "
                    "`shards/build.py verify OUT` re-hashes and decodes a finished build.",
        epilog=BUILD_EXIT_CODES)
    parser.add_argument("--images", nargs="+", required=True, help="image folders, searched recursively")
    parser.add_argument("--labels", required=True,
                        help="CSV with challenge_id,class: ids without extension, classes RG/NRG or 1/0")
    parser.add_argument("--out", required=True, help="output folder for shards and manifest.json")
    parser.add_argument("--preset", type=int, choices=sorted(PRESET_SHARD_SIZES),
                        help="the resolution you train at: sets --size to it and --shard-size to "
                             + ", ".join(f"{n} at {size}" for size, n in PRESET_SHARD_SIZES.items())
                             + " px (about 150-300 MB per shard of fundus JPEGs at quality 95, 230-470 MB with "
                               "--clahe); --size or --shard-size given as well win (default: no preset)")
    parser.add_argument("--size", type=int, help="side of the stored square image (default: the preset's, else 512)")
    parser.add_argument("--quality", type=int, default=95,
                        help="JPEG quality of the stored image (default: %(default)s)")
    parser.add_argument("--shard-size", type=int, help="samples per shard (default: the preset's, else 1000)")
    parser.add_argument("--clahe", type=_clahe_argument, metavar="CLIP,GRID",
                        help="apply CLAHE (clip limit, tile grid, e.g. 2.0,8) once here, after the resize, and "
                             "record it in manifest.json; train these shards with data.clahe=false (default: none)")
    parser.add_argument("--max-shard-bytes", type=int, default=None,
                        help="target shard size; samples per shard estimated from a probe "
                             "(default: none, --shard-size decides)")
    parser.add_argument("--workers", type=int, default=2, help="processes writing shards (default: %(default)s)")
    split = parser.add_mutually_exclusive_group()
    split.add_argument("--val-fraction", type=float, default=0.2,
                       help="stratified random validation share (default: %(default)s)")
    split.add_argument("--split-column", help="CSV column holding train/val (default: none, a random split)")
    split.add_argument("--val-dirs", nargs="+", default=(),
                       help="image folders held out as validation (default: none, a random split)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and shard order (default: %(default)s)")
    parser.add_argument("--max-rejected-fraction", type=float, default=0.01,
                        help="unreadable images tolerated before the build fails (default: %(default)s)")
    parser.add_argument("--skip-missing", action="store_true",
                        help="ignore labelled ids without an image and images without a label")
    args = parser.parse_args(argv)
    if args.size is None:
        args.size = args.preset or 512
    if args.shard_size is None:
        args.shard_size = PRESET_SHARD_SIZES.get(args.preset, 1000)
    if args.size < 8 or not 1 <= args.quality <= 100 or args.shard_size < 1 or args.workers < 1:
        parser.error("need --size >= 8, 1 <= --quality <= 100, --shard-size >= 1, --workers >= 1")
    if not 0 <= args.val_fraction < 1 or not 0 <= args.max_rejected_fraction <= 1:
        parser.error("need 0 <= --val-fraction < 1 and 0 <= --max-rejected-fraction <= 1")
    return args


def _clahe_argument(text: str) -> Clahe:
    try:
        return parse_clahe(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def run_build(argv: list[str]) -> int:
    args = parse_build_args(argv)
    options = BuildOptions(
        size=args.size, quality=args.quality, shard_size=args.shard_size, max_shard_bytes=args.max_shard_bytes,
        workers=args.workers, seed=args.seed, val_fraction=args.val_fraction, split_column=args.split_column,
        val_dirs=tuple(args.val_dirs), max_rejected_fraction=args.max_rejected_fraction,
        skip_missing=args.skip_missing, clahe=args.clahe,
    )
    try:
        report = build(args.images, args.labels, args.out, options)
    except ShardInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TooManyRejectedError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(summary(report, args.out))
    if report.manifest["degenerate"]:
        print(degenerate_warning(report.manifest["degenerate"]), file=sys.stderr)
    for line in one_class_warnings(report.manifest["totals"]):
        print(line, file=sys.stderr)
    return 0


def one_class_warnings(totals: dict) -> list[str]:
    """A split with samples of one class only: train.py refuses such training shards, and α/β need both."""
    lines = []
    for split, counts in totals.items():
        if counts["samples"] and counts["positives"] in (0, counts["samples"]):
            kind = "no RG (referable)" if counts["positives"] == 0 else "only RG (referable)"
            lines.append(f"warning: {split} holds {kind} samples among {counts['samples']}: check the labels CSV's "
                         f"class column (RG/NRG)")
    return lines


def summary(report, out: str) -> str:
    manifest = report.manifest
    counts = {split: sum(1 for s in manifest["shards"] if s["split"] == split) for split in ("train", "val")}
    parts = [f"{split} {t['samples']} samples ({t['positives']} RG) in {counts[split]} shards"
             for split, t in manifest["totals"].items()]
    processed = sum(t["samples"] for t in manifest["totals"].values()) + len(manifest["rejected"])
    lines = [f"{out}: " + ", ".join(parts),
             f"rejected {len(manifest['rejected'])}, skipped {manifest['skipped']['missing_images']} labelled ids "
             f"without an image and {manifest['skipped']['unlabelled_images']} images without a label; "
             f"{report.written} shards written, {report.reused} reused; "
             f"{report.seconds:.1f} s ({processed / max(report.seconds, 1e-9):.1f} images/s)"]
    lines += [f"rejected {r['path']}: {r['reason']}" for r in manifest["rejected"][:10]]
    if report.oversized:
        lines.append(f"warning: {len(report.oversized)} shards exceed --max-shard-bytes: {report.oversized[:5]}")
    return "\n".join(lines)


def degenerate_warning(records: list[dict]) -> str:
    """One line: the images stored although their shape is far from a fundus photograph's."""
    shown = ", ".join(f"{r['path']} ({r['original_size'][0]}x{r['original_size'][1]})" for r in records[:5])
    more = f" and {len(records) - 5} more" if len(records) > 5 else ""
    return (f"warning: {len(records)} images have an aspect ratio beyond {MAX_ASPECT_RATIO:g}:1, stored but "
            f"probably not fundus photographs (listed under 'degenerate' in manifest.json): {shown}{more}")


def run_verify(argv: list[str]) -> int:
    parser = ArgumentParser(prog="build.py verify", description="Re-hash and decode built shards.",
                            epilog=VERIFY_EXIT_CODES)
    parser.add_argument("out", help="shard folder holding manifest.json")
    args = parser.parse_args(argv)
    try:
        lines, problems = verify(args.out)
    except UnfinishedBuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except ShardInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as error:
        print(f"error: {args.out}: {error}", file=sys.stderr)
        return 2
    print("\n".join(lines + problems))
    print(f"{'FAILED' if problems else 'OK'}: {len(lines)} shards, {len(problems)} problems")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return run_verify(argv[1:]) if argv[:1] == ["verify"] else run_build(argv)


if __name__ == "__main__":
    sys.exit(main())
