"""Where CLAHE runs: once when the shards are built, or every epoch in the Decoder; never both, never neither.

CLAHE is deterministic, so `shards/build.py --clahe CLIP,GRID` can apply it once (after the builder's resize,
the order the Decoder uses) and record it in the manifest under `preprocessing.clahe`; training and
prediction then skip it. This module is the one place that reads that record beside `data.clahe` and the
export's `preprocess` and decides whether a Decoder still applies CLAHE, so that no path applies it twice
(CLAHE of CLAHE sharpens noise the model never saw) or silently leaves it out (raw images fed to a model
that learned on equalised ones).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from dist_train.config import DataConfig
from dist_train.data.manifest import shard_preprocessing
from dist_train.errors import UserError

BUILD, DECODER = "build", "decoder"
"""Where the model's inputs got their CLAHE (the export's `clahe_at`)."""


class ClaheError(UserError, ValueError):
    """CLAHE would be applied twice, or the splits or the model and its input disagree on it."""


class Clahe(NamedTuple):
    """CLAHE's parameters; a plain (clip limit, tile grid) tuple, as the Decoder and shard_jpeg take them."""

    clip_limit: float
    tile_grid: int

    def record(self) -> dict[str, float | int]:
        """The manifest's `preprocessing.clahe` entry."""
        return {"clip_limit": self.clip_limit, "tile_grid": self.tile_grid}

    def __str__(self) -> str:
        return f"{self.clip_limit:g},{self.tile_grid}"


@dataclass(frozen=True)
class ClahePlan:
    """What training does about CLAHE: what its Decoders apply, and what the model's inputs have had."""

    in_decoder: Clahe | None
    """Applied to every sample every epoch (None: the shards have it already, or nobody asked for it)."""
    expected: Clahe | None
    """The CLAHE every model input has had, wherever it ran: what an export must ask of new inputs."""


def parse_clahe(text: str) -> Clahe:
    """`--clahe CLIP,GRID` (e.g. 2.0,8), in the ranges data.clahe_clip_limit and data.clahe_tile_grid take."""
    parts = text.split(",")
    try:
        clip, grid = float(parts[0]), int(parts[1])
    except (ValueError, IndexError):
        raise ValueError(f"{text!r} is not CLIP,GRID such as 2.0,8") from None
    if len(parts) != 2 or not 0.1 <= clip <= 100 or not 1 <= grid <= 64:
        raise ValueError(f"{text!r}: need CLIP,GRID with 0.1 <= CLIP <= 100 and 1 <= GRID <= 64, such as 2.0,8")
    return Clahe(clip, grid)


def clahe_from_record(record: Mapping[str, Any] | None) -> Clahe | None:
    """A manifest's or a saved run's `preprocessing.clahe` entry (absent or None: raw shards)."""
    if not record:
        return None
    return Clahe(float(record["clip_limit"]), int(record["tile_grid"]))


def shards_clahe(urls: list[str], manifest_setting: str = "auto") -> Clahe | None:
    """The CLAHE the shards were built with, from their manifest; None for raw shards or none found.

    Follows data.manifest as the sizes and counts do: with 'none' the shards are taken as raw."""
    return clahe_from_record(shard_preprocessing(urls, manifest_setting).get("clahe"))


def configured_clahe(data: DataConfig) -> Clahe | None:
    return Clahe(data.clahe_clip_limit, data.clahe_tile_grid) if data.clahe else None


def effective_clahe(data: DataConfig, train: Clahe | None, val: Clahe | None) -> ClahePlan:
    """Training's CLAHE from the config and the two splits' records; refuses what would mislead the model.

    Refused: data.clahe on shards built with --clahe (applied twice), and train and val shards that
    disagree (the model would be validated on inputs unlike its training inputs)."""
    if train != val:
        raise ClaheError(f"{data.train_shards} were built {_built(train)} but {data.val_shards} "
                         f"{_built(val)}; rebuild one split so both match")
    wanted = configured_clahe(data)
    if train is not None and wanted is not None:
        raise ClaheError(f"CLAHE would be applied twice: data.clahe is true and {data.train_shards} were built "
                         f"with --clahe {train}; set data.clahe=false (the shards already have it)")
    return ClahePlan(in_decoder=wanted, expected=train or wanted)


def clahe_plan(data: DataConfig, train_urls: list[str], val_urls: list[str]) -> ClahePlan:
    """effective_clahe with both splits' records read from their manifests (preflight and the Trainer)."""
    return effective_clahe(data, shards_clahe(train_urls, data.manifest), shards_clahe(val_urls, data.manifest))


def _built(clahe: Clahe | None) -> str:
    """How shards were built, in every message that says it: 'with --clahe 2,8' or 'without --clahe'."""
    return f"with --clahe {clahe}" if clahe else "without --clahe"


# ---------------------------------------------------------------- export and prediction


def export_clahe(data: Mapping[str, Any], shard_preprocessing: Mapping[str, Any]) -> dict[str, Any]:
    """The export's CLAHE fields from a run's config `data` section and its training shards' preprocessing.

    `clahe` says whether the model expects CLAHE'd input at all (so an older reader that only knows it
    still applies CLAHE to raw images); `clahe_at` says where training applied it."""
    built = clahe_from_record(shard_preprocessing.get("clahe"))
    expected = built or (Clahe(float(data["clahe_clip_limit"]), int(data["clahe_tile_grid"])) if data["clahe"]
                         else None)
    return {"clahe": expected is not None,
            "clahe_clip_limit": expected.clip_limit if expected else data["clahe_clip_limit"],
            "clahe_tile_grid": expected.tile_grid if expected else data["clahe_tile_grid"],
            "clahe_at": (BUILD if built else DECODER) if expected else None}


def expected_clahe(preprocess: Mapping[str, Any]) -> Clahe | None:
    """The CLAHE an export's model expects of its input (exports without `clahe_at` applied it in the decoder)."""
    if not preprocess.get("clahe"):
        return None
    return Clahe(float(preprocess["clahe_clip_limit"]), int(preprocess["clahe_tile_grid"]))


def raw_image_clahe(preprocess: Mapping[str, Any]) -> Clahe | None:
    """CLAHE to apply to a raw image before its JPEG re-encode: what the builder did for a CLAHE-at-build model,
    so a raw image and its shard sample give the same bytes; None when training applied it after decoding."""
    return expected_clahe(preprocess) if preprocess.get("clahe_at") == BUILD else None


def prediction_clahe(preprocess: Mapping[str, Any], input_clahe: Clahe | None) -> Clahe | None:
    """The CLAHE the predictor's Decoder applies to input that has had `input_clahe` (None: raw input).

    Raw input always gets the CLAHE the model expects, wherever training applied it; input that has it
    already is not equalised again; input equalised unlike the model's training input is refused."""
    expected = expected_clahe(preprocess)
    if input_clahe is None:
        return expected
    if expected != input_clahe:
        wanted = f"CLAHE {expected}" if expected else "raw (no CLAHE)"
        raise ClaheError(f"the input was built {_built(input_clahe)} but the model expects {wanted} input: "
                         f"score shards built {_built(expected)}, "
                         "or the raw images")
    return None


def upsampling_warning(shard_preprocessing: dict[str, Any], image_size: int) -> str | None:
    """Training above the size the shards were built at upsamples every image: detail that is not there."""
    built = shard_preprocessing.get("size")
    if built is None or image_size <= built:
        return None
    return (f"data.image_size={image_size} is larger than the {built} px the shards were built at: "
            f"every image is upsampled; rebuild the shards with shards/build.py --size {image_size}")
