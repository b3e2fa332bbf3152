"""Export a checkpoint to one safetensors file, and score images or shards with it.

The export carries everything prediction needs (model config, preprocessing with CLAHE, TTA, the
threshold chosen on validation for 95% specificity), so `launch/predict.py` cannot forget a step
that training applied. Raw JPEGs go through the same crop, resize and JPEG re-encode as
`shards/build.py`, so a raw image and its shard sample give the same score.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save
from torch import nn

from dist_train.config import DataConfig, config_from_dict
from dist_train.data.decode import Decoder
from dist_train.data.preprocess import Clahe, export_clahe, prediction_clahe, raw_image_clahe, shards_clahe
from dist_train.data.stream import EvalStream, make_loader
from dist_train.data.transforms import BadImageError, load_fundus, shard_jpeg
from dist_train.errors import CheckpointError, UserError
from dist_train.evaluation.scoring import Scores, score_stream
from dist_train.model.network import GlaucomaNet, build_model, export_meta_path, load_for_inference
from dist_train.shards.inputs import IMAGE_SUFFIXES, offenders
from dist_train.tracking import Progress
from dist_train.train import checkpoint, sharded


class InputError(UserError, ValueError):
    """A bad --model, --images, --shards, --out or option: the commands exit 2 before any work."""


def export(source: Path, out: Path) -> Path:
    """Consolidate a run's best (else latest) checkpoint, or a given checkpoint folder, into `out`."""
    folder = _checkpoint_folder(source)
    try:
        state = checkpoint.read_trainer_state(folder)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot read {folder / checkpoint.TRAINER_FILE} ({type(error).__name__}: {error}); "
                              f"export another checkpoint folder of the run (launch/export.py RUN/checkpoints/NAME)"
                              ) from None
    if state["engine"] == "deepspeed":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        weights = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag="deepspeed")
    else:
        weights = sharded.model_weights(folder)
    config = state["config"]
    model_cfg = config_from_dict(config, str(folder / checkpoint.TRAINER_FILE)).model
    model = build_model(dataclasses.replace(model_cfg, pretrained="none", compile=False),
                        image_size=config["data"]["image_size"])
    model.load_state_dict(_plain_names(weights), strict=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(out, save({name: tensor.contiguous() for name, tensor in model.state_dict().items()}))
    _write_atomic(export_meta_path(out), json.dumps(_meta(config, state, folder, model), indent=2).encode())
    return out


def _plain_names(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys without torch.compile's `_orig_mod.` prefix: checkpoints of older DeepSpeed runs that compiled
    the module itself carry it (the engines now compile what they run and save the plain module)."""
    return {name.removeprefix("_orig_mod."): tensor for name, tensor in weights.items()}


def _write_atomic(path: Path, data: bytes) -> None:
    """Through Python's open, so the file gets the umask's mode like every other output (safetensors' own
    writer makes it 0600), and under a temporary name, so an interrupted export leaves the old file whole."""
    staging = path.with_name(path.name + ".tmp")
    with open(staging, "wb") as handle:
        handle.write(data)
    os.replace(staging, path)


def _checkpoint_folder(source: Path) -> Path:
    if not source.is_dir():
        raise CheckpointError(f"{source}: no such run directory or checkpoint folder")
    if (source / checkpoint.TRAINER_FILE).is_file():
        return source
    root = source / "checkpoints" if (source / "checkpoints").is_dir() else source
    name = checkpoint.read_pointer(root / "best") or checkpoint.read_pointer(root / "latest")
    if name is None:
        raise CheckpointError(f"{source}: no checkpoint found (no best or latest pointer)")
    return root / name


def _meta(config: dict[str, Any], state: dict[str, Any], folder: Path, model: GlaucomaNet) -> dict[str, Any]:
    data, shards = config["data"], state.get("shard_preprocessing") or {}
    best = state["trainer"].get("best_record") or {}
    return {
        "format": "dist_train-export/1",
        "model": config["model"],
        "preprocess": {"image_size": data["image_size"], **export_clahe(data, shards),
                       "mean": list(model.data_config["mean"]), "std": list(model.data_config["std"]),
                       "shard_size": shards.get("size"), "shard_quality": shards.get("quality", 95)},
        "tta": config["eval"]["tta"],
        "threshold": best.get("beta_threshold"),
        "threshold_rule": "beta operating point: specificity >= 0.95 on the validation set",
        "validation": best,
        "checkpoint": str(folder),
        "step": state["trainer"]["step"],
    }


# ---------------------------------------------------------------- scoring


@dataclass
class Predictor:
    model: nn.Module
    meta: dict[str, Any]
    device: torch.device

    @classmethod
    def load(cls, path: Path, device: str = "cpu") -> Predictor:
        model, meta = load_for_inference(export_file(path))
        return cls(model.to(device), meta, torch.device(device))

    def decoder(self, input_clahe: Clahe | None = None) -> Decoder:
        """The evaluation decoder for input that has had `input_clahe` (None: raw pixels; see prediction_clahe)."""
        pre = self.meta["preprocess"]
        clahe = prediction_clahe(pre, input_clahe)
        return Decoder(pre["image_size"], tuple(pre["mean"]), tuple(pre["std"]), clahe, None)

    def shards_decoder(self, urls: list[str]) -> Decoder:
        """The decoder for these shards; shards equalised unlike the model's training input are refused here."""
        return self.decoder(shards_clahe(urls))

    def prepare(self, path: Path) -> bytes:
        """A raw image as the JPEG bytes its shard sample would hold: the builder's crop and resize, the CLAHE
        of a CLAHE-at-build model, the export's JPEG quality. Raises BadImageError for an unreadable file."""
        pre = self.meta["preprocess"]
        return shard_jpeg(_load_fundus(path, pre.get("shard_size") or 512), pre.get("shard_quality") or 95,
                          raw_image_clahe(pre))

    def score_shards(self, urls: list[str], total: int, batch_size: int = 64, workers: int = 0,
                     progress: str = "none", desc: str = "scoring") -> Scores:
        """Every sample of the shards; corrupt ones land in `bad` (url, key, reason), as in training."""
        stream = EvalStream(urls, self.shards_decoder(urls), batch_size, 0, 1, workers)
        data = DataConfig(train_shards="-", val_shards=urls[0], workers=workers)
        with Progress(progress, total, desc=desc) as bar:
            return score_stream(self.model, _counted(make_loader(stream, data, False), bar), self.device,
                                self.meta["tta"], None, contextlib.nullcontext)

    def score_images(self, images: dict[str, Path], batch_size: int = 32, progress: str = "none",
                     desc: str = "scoring") -> Scores:
        """Raw fundus images (id -> path) through the shard builder's preprocessing, then the evaluation decoder.

        An unreadable image is skipped into `bad` as (path, id, reason) rather than ending the run.
        """
        items, merged = sorted(images.items()), Scores([], [], [], 0.0, [])
        with Progress(progress, len(items), desc=desc) as bar:
            for start in range(0, len(items), batch_size):
                chunk = items[start:start + batch_size]
                part = self._score_chunk(chunk)
                merged.keys += part.keys
                merged.scores += part.scores
                merged.bad += part.bad
                bar.update(len(chunk))
        merged.labels = [0] * len(merged.keys)
        return merged

    def _score_chunk(self, chunk: list[tuple[str, Path]]) -> Scores:
        decoder = self.decoder(raw_image_clahe(self.meta["preprocess"]))
        tensors, keys, bad = [], [], []
        for key, path in chunk:
            try:
                sample = self.prepare(path)
            except BadImageError as error:
                bad.append((str(path), key, str(error)))
                continue
            tensors.append(decoder({"jpg": sample}, 0))
            keys.append(key)
        if not keys:
            return Scores([], [], [], 0.0, bad)
        batch = _ImageBatch(torch.stack(tensors), torch.zeros(len(keys)), keys)
        part = score_stream(self.model, [batch], self.device, self.meta["tta"], None, contextlib.nullcontext)
        return Scores(part.keys, part.labels, part.scores, 0.0, bad)


def _load_fundus(path: Path, size: int):
    """The builder's crop and resize; an empty file (an interrupted copy) is called that, not 'unidentified'."""
    try:
        empty = path.stat().st_size == 0
    except OSError as error:
        raise BadImageError(f"cannot read: {error.strerror}") from error
    if empty:
        raise BadImageError("empty file (0 bytes)")
    return load_fundus(path, size)[0]


def list_images(root: Path) -> dict[str, Path]:
    """id -> image under `root`, the id being its path under root without extension.

    For a flat AIROGS folder that is the challenge id (TRAIN000000); in nested folders day1/img001 and
    day2/img001 stay two rows. Two files that differ only by extension would share an id, so are refused.
    """
    if not root.is_dir():
        raise InputError(f"--images {root}: not a folder")
    images: dict[str, Path] = {}
    clashes = []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        key = path.relative_to(root).with_suffix("").as_posix()
        if key in images:
            clashes.append(f"{images[key]} and {path}")
        images.setdefault(key, path)
    if not images:
        raise InputError(f"--images {root}: no {', '.join(sorted(IMAGE_SUFFIXES))} files under it")
    if clashes:
        raise InputError(f"--images {root}: " + offenders("images that differ only by extension", clashes)
                         + "; keep one of each")
    return images


def _counted(loader: Iterable, bar: Progress) -> Iterator:
    """The loader's batches, advancing the progress display by the samples each one carried."""
    for batch in loader:
        yield batch
        bar.update(len(batch.keys) + len(batch.bad))


@dataclass
class _ImageBatch:
    """The shape score_stream reads from a loader batch (images, labels, keys, bad)."""

    images: torch.Tensor
    labels: torch.Tensor
    keys: list[str]
    bad: tuple = ()


def export_file(path: Path) -> Path:
    """The export a --model names: the file itself, or a run directory's export/model.safetensors."""
    if path.is_dir():
        candidate = path / "export" / "model.safetensors"
        if not candidate.is_file():
            raise FileNotFoundError(f"--model {path}: no export at {candidate}; run launch/export.py {path} first")
        return candidate
    if not path.is_file():
        raise FileNotFoundError(f"--model {path}: no such file or run directory")
    return path
