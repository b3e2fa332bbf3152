"""Export a checkpoint to one safetensors file, and score images or shards with it.

The export carries everything prediction needs (model config, preprocessing with CLAHE, TTA, the
threshold chosen on validation for 95% specificity), so `launch/predict.py` cannot forget a step
that training applied. Raw JPEGs go through the same crop, resize and JPEG re-encode as
`shards/build.py`, so a raw image and its shard sample give the same score.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from dist_train import checkpoint
from dist_train.config import DataConfig, ModelConfig
from dist_train.data import Decoder, EvalStream, make_loader, shard_urls
from dist_train.evaluate import Scores, score_stream
from dist_train.model import build_model, export_meta_path, load_for_inference


def export(source: Path, out: Path) -> Path:
    """Consolidate a run's best (else latest) checkpoint, or a given checkpoint folder, into `out`."""
    folder = _checkpoint_folder(source)
    state = checkpoint.read_trainer_state(folder)
    if state["engine"] == "deepspeed":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        weights = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag="deepspeed")
    else:
        weights = _dcp_model_weights(folder)
    config = state["config"]
    model = build_model(ModelConfig(**{**config["model"], "pretrained": "none", "compile": False}))
    model.load_state_dict(weights, strict=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()}, str(out))
    export_meta_path(out).write_text(json.dumps(_meta(config, state, folder, model), indent=2))
    return out


def _checkpoint_folder(source: Path) -> Path:
    if (source / checkpoint.TRAINER_FILE).is_file():
        return source
    root = source / "checkpoints" if (source / "checkpoints").is_dir() else source
    name = checkpoint.read_pointer(root / "best") or checkpoint.read_pointer(root / "latest")
    if name is None:
        raise checkpoint.CheckpointError(f"{source}: no checkpoint found (no best or latest pointer)")
    return root / name


def _dcp_model_weights(folder: Path) -> dict[str, torch.Tensor]:
    """DCP's own consolidation, as `dcp_to_torch_save` does it, but through the metadata reader that runs no code.

    The public `dcp.load` only fills keys it is given; consolidating without knowing them takes the same
    private entry point that torch's own converter uses.
    """
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict[str, Any] = {}
    _load_state_dict(state, storage_reader=checkpoint.SafeMetadataReader(str(folder)),
                     planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    return state["model"]


def _meta(config: dict[str, Any], state: dict[str, Any], folder: Path, model: nn.Module) -> dict[str, Any]:
    data, shards = config["data"], state.get("shard_preprocessing") or {}
    best = state["trainer"].get("best_record") or {}
    return {
        "format": "dist_train-export/1",
        "model": config["model"],
        "preprocess": {"image_size": data["image_size"], "clahe": data["clahe"],
                       "clahe_clip_limit": data["clahe_clip_limit"], "clahe_tile_grid": data["clahe_tile_grid"],
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
        model, meta = load_for_inference(_export_file(path))
        return cls(model.to(device), meta, torch.device(device))

    def decoder(self) -> Decoder:
        pre = self.meta["preprocess"]
        clahe = (pre["clahe_clip_limit"], pre["clahe_tile_grid"]) if pre["clahe"] else None
        return Decoder(pre["image_size"], tuple(pre["mean"]), tuple(pre["std"]), clahe, None)

    def score_shards(self, url: str, batch_size: int = 64, workers: int = 0) -> Scores:
        stream = EvalStream(shard_urls(url), self.decoder(), batch_size, 0, 1, workers)
        data = DataConfig(train_shards="-", val_shards=url, workers=workers)
        return score_stream(self.model, make_loader(stream, data, False), self.device, self.meta["tta"], None,
                            contextlib.nullcontext)

    def score_images(self, paths: list[Path], shard_size: int, quality: int, batch_size: int = 32) -> Scores:
        """Raw fundus JPEGs through the shard builder's preprocessing, then the evaluation decoder."""
        from dist_train.transforms import load_fundus

        decoder, keys, scores = self.decoder(), [], []
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            images = torch.stack([decoder({"jpg": _reencode(load_fundus(p, shard_size)[0], quality)}, 0)
                                  for p in chunk])
            batch = _ImageBatch(images, torch.zeros(len(chunk)), [p.stem for p in chunk])
            part = score_stream(self.model, [batch], self.device, self.meta["tta"], None, contextlib.nullcontext)
            keys += part.keys
            scores += part.scores
        return Scores(keys, [0] * len(keys), scores, 0.0, [])


@dataclass
class _ImageBatch:
    """The shape score_stream reads from a loader batch (images, labels, keys, bad)."""

    images: torch.Tensor
    labels: torch.Tensor
    keys: list[str]
    bad: tuple = ()


def _reencode(image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _export_file(path: Path) -> Path:
    if path.is_dir():
        candidate = path / "export" / "model.safetensors"
        if not candidate.is_file():
            raise FileNotFoundError(f"{path}: no export at {candidate}; run launch/export.py {path} first")
        return candidate
    return path


def write_prediction_csv(path: Path, scores: Scores, threshold: float | None) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "likelihood", "referable_glaucoma"])
        for key, score in sorted(zip(scores.keys, scores.scores)):
            decision = "" if threshold is None else int(score >= threshold)
            writer.writerow([key, f"{score:.8g}", decision])
