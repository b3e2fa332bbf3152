"""Checkpoints as users download them, translated to the names and shapes of a timm backbone.

A weight file comes in whatever layout its training code wrote: a timm state dict, the lukemelas
EfficientNet names of the packaged Lite0 ImageNet weights, a RETFound MAE checkpoint (encoder and
decoder under 'model'), a DINOv2 checkpoint (teacher/student wrappers, 'backbone.' prefix). The
format is detected from the file's keys, one function per format translates it, and every result
goes through one fit check (names and shapes against the backbone), so a file never loads partly or
into the wrong tensors without the error naming them. `Adapted.summary()` is the log line that says
what was loaded, what was ignored on purpose and what starts fresh.

RETFound's fine-tuning builds its ViT with global pooling (`fc_norm`) and leaves `fc_norm` at its
initialisation while the MAE's final `norm` goes unused; a backbone with `fc_norm` is treated the
same way here (`norm.*` ignored, `fc_norm.*` fresh), to reproduce the recipe RETFound's results
come from rather than reuse a norm trained for per-token statistics on the pooled features.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from dist_train.errors import WeightsError

LITE0_STEM = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
"""lukemelas names outside the blocks -> timm EfficientNet names."""

LITE0_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
"""A block without expansion (timm's DepthwiseSeparableConv): depthwise, BN, pointwise, BN."""

LITE0_INVERTED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                  "_project_conv": "conv_pwl", "_bn2": "bn3"}
"""An inverted-residual block (timm's InvertedResidual): expand, BN, depthwise, BN, project, BN."""

FOUNDATION_IGNORED = ("decoder_", "mask_token", "head.", "dino_head.", "ibot_head.")
"""Tensors of MAE/DINO training that a fine-tuned encoder has no place for."""

EXPECTED_FORMATS = ("a state dict of tensors (timm names, or a dist_train model), {'model': state dict} "
                    "(RETFound MAE), {'teacher'|'student': {'backbone.*': ...}} or a DINOv2 hub file, "
                    "or the lukemelas EfficientNet-Lite0 names")


@dataclass
class Adapted:
    """A checkpoint in the backbone's names, and what became of every tensor of the file."""

    format: str
    state_dict: dict[str, torch.Tensor]
    ignored: list[str] = field(default_factory=list)
    """File tensors left out on purpose (a decoder, a projection head, a classifier the backbone lacks)."""
    fresh: list[str] = field(default_factory=list)
    """Backbone tensors the format does not carry, kept at their initialisation on purpose."""
    sources: dict[str, str] = field(default_factory=dict)
    """Backbone name -> file name where they differ, so an error names the tensor as the file spells it."""
    notes: list[str] = field(default_factory=list)

    def summary(self, path: str) -> str:
        """One log line: format, loaded, ignored, fresh (missing on purpose), and any resizing done."""
        notes = "".join(f"; {note}" for note in self.notes)
        return (f"model.pretrained: {path} ({self.format}): loaded {len(self.state_dict)} tensors; "
                f"ignored {len(self.ignored)} [{abridge(self.ignored)}]; missing, left at init "
                f"{len(self.fresh)} [{abridge(self.fresh)}]{notes}")


def adapt(checkpoint: Any, backbone: nn.Module, path: str) -> Adapted:
    """The checkpoint translated for `backbone` and checked against it (names and shapes), or WeightsError."""
    fmt = detect_format(checkpoint, path)
    adapted = ADAPTERS[fmt](checkpoint, backbone, path)
    check_fit(adapted, backbone, path)
    return adapted


def detect_format(checkpoint: Any, path: str) -> str:
    """Which of ADAPTERS' formats the file is in, from its keys; WeightsError naming the file if none."""
    if isinstance(checkpoint, Mapping) and any(isinstance(checkpoint.get(key), Mapping)
                                               for key in ("teacher", "student")):
        return "dinov2"
    tensors = tensor_dict(checkpoint, path)
    if "_conv_stem.weight" in tensors:
        return "efficientnet-lite0"
    if any(key.startswith("decoder_") for key in tensors):
        return "retfound-mae"
    if "mask_token" in tensors or "register_tokens" in tensors:
        return "dinov2"
    return "timm"


def tensor_dict(checkpoint: Any, path: str) -> dict[str, torch.Tensor]:
    """The names -> tensors of a checkpoint, unwrapped from 'model'/'state_dict' and DDP's 'module.' prefix."""
    if isinstance(checkpoint, Mapping):
        for wrapper in ("model", "state_dict"):
            if isinstance(checkpoint.get(wrapper), Mapping):
                checkpoint = checkpoint[wrapper]
                break
    if not (isinstance(checkpoint, Mapping) and checkpoint
            and all(isinstance(value, torch.Tensor) for value in checkpoint.values())):
        raise WeightsError(f"model.pretrained: {path}: unknown checkpoint format ({_describe(checkpoint)}); "
                           f"expected {EXPECTED_FORMATS}")
    return {str(key).removeprefix("module."): value for key, value in checkpoint.items()}


# ---------------------------------------------------------------- one function per format


def from_timm(checkpoint: Any, backbone: nn.Module, path: str) -> Adapted:
    """A state dict in timm's own names; only the source model's classifier may be left out."""
    tensors = tensor_dict(checkpoint, path)
    classifier = _classifier_prefixes(backbone)
    own = backbone.state_dict()
    ignored = [key for key in tensors if key not in own and key.startswith(classifier)]
    adapted = Adapted("timm", {key: value for key, value in tensors.items() if key not in ignored}, ignored)
    if "pos_embed" in adapted.state_dict and _is_vit(backbone):
        _fit_positions(adapted, _pos_prefix(backbone), backbone)
    return adapted


def from_lite0(checkpoint: Any, backbone: nn.Module, path: str) -> Adapted:
    """The packaged lukemelas-style EfficientNet-Lite0 names mapped, name by name, to timm's tf_efficientnet_lite0.

    `_blocks.i` is the i-th block counted across timm's stages; a block without `_expand_conv` is a
    depthwise-separable one, whose `_bn1`/`_bn2` are timm's `bn1`/`bn2` (in an inverted residual block
    they are `bn2`/`bn3`). The fit check then compares every tensor's shape.
    """
    tensors = tensor_dict(checkpoint, path)
    stages = cast(nn.Sequential, getattr(backbone, "blocks", nn.Sequential()))
    blocks = [f"{stage}.{index}" for stage, modules in enumerate(stages)
              for index in range(len(cast(nn.Sequential, modules)))]
    adapted = Adapted("efficientnet-lite0", {})
    for key, value in tensors.items():
        name = _lite0_name(key, tensors, blocks, path)
        adapted.state_dict[name], adapted.sources[name] = value, key
    classifier = _classifier_prefixes(backbone)
    own = backbone.state_dict()
    for name in [name for name in adapted.state_dict if name not in own and name.startswith(classifier)]:
        del adapted.state_dict[name]
        adapted.ignored.append(adapted.sources.pop(name))
    return adapted


def from_retfound_mae(checkpoint: Any, backbone: nn.Module, path: str) -> Adapted:
    """A RETFound/MAE checkpoint: the encoder of {'model': ...}; decoder and mask token ignored."""
    return _vit_encoder("retfound-mae", tensor_dict(checkpoint, path), backbone, path)


def from_dinov2(checkpoint: Any, backbone: nn.Module, path: str) -> Adapted:
    """A DINOv2 checkpoint: the teacher's (else the student's) 'backbone.*', or a hub file's plain names.

    The teacher is what DINOv2 evaluates and releases. Registers become timm's `reg_token`; chunked
    blocks (`blocks.<chunk>.<i>.`) and SwiGLU's `w12`/`w3` take timm's names.
    """
    ignored: list[str] = []
    if isinstance(checkpoint, Mapping) and any(isinstance(checkpoint.get(key), Mapping)
                                               for key in ("teacher", "student")):
        wrapper = "teacher" if isinstance(checkpoint.get("teacher"), Mapping) else "student"
        tensors = tensor_dict(checkpoint[wrapper], path)
        ignored = [f"{wrapper}.{key}" for key in tensors if not key.startswith("backbone.")]
        tensors = {key.removeprefix("backbone."): value for key, value in tensors.items()
                   if key.startswith("backbone.")}
    else:
        tensors = tensor_dict(checkpoint, path)
    tensors = {_dinov2_name(key): value for key, value in tensors.items()}
    if "register_tokens" in tensors:
        tensors["reg_token"] = tensors.pop("register_tokens")
    adapted = _vit_encoder("dinov2", tensors, backbone, path)
    adapted.ignored[:0] = ignored
    return adapted


ADAPTERS = {"timm": from_timm, "efficientnet-lite0": from_lite0, "retfound-mae": from_retfound_mae,
            "dinov2": from_dinov2}


# ---------------------------------------------------------------- ViT encoders and positions


def _vit_encoder(fmt: str, tensors: dict[str, torch.Tensor], backbone: nn.Module, path: str) -> Adapted:
    """An MAE/DINO encoder (class token position inside pos_embed) fitted to a timm ViT built at the run's size."""
    if not _is_vit(backbone):
        raise WeightsError(f"model.pretrained: {path} is a {fmt} checkpoint of a ViT; model.backbone "
                           f"{type(backbone).__name__} is not a timm ViT (choose e.g. vit_large_patch16_224)")
    own = backbone.state_dict()
    ignored = [key for key in tensors if key.startswith(FOUNDATION_IGNORED) and key not in own]
    if not any(key.startswith("norm.") for key in own) and any(key.startswith("fc_norm.") for key in own):
        ignored += [key for key in tensors if key.startswith("norm.")]  # RETFound's global-pool recipe
    kept = {key: value for key, value in tensors.items() if key not in ignored}
    fresh = [key for key in own if key.startswith("fc_norm.") and key not in kept]
    adapted = Adapted(fmt, kept, ignored, fresh)
    if "pos_embed" in kept:
        _fit_positions(adapted, 1, backbone)
    return adapted


def _fit_positions(adapted: Adapted, file_prefix: int, backbone: nn.Module) -> None:
    """pos_embed resampled to the backbone's patch grid, its prefix (class, register) positions made to match.

    A backbone without prefix positions (timm's DINOv2-with-registers layout) gets the class token's
    position added into the class token, as timm converts DINOv2; register positions a file lacks are
    zero (DINOv2's registers have none).
    """
    state = adapted.state_dict
    pos_embed = state["pos_embed"]
    prefix, grid = pos_embed[:, :file_prefix], pos_embed[:, file_prefix:]
    side = math.isqrt(grid.shape[1])
    target_grid = [int(size) for size in cast(Any, backbone.patch_embed).grid_size]
    if side * side != grid.shape[1]:
        raise WeightsError(f"model.pretrained: pos_embed {tuple(pos_embed.shape)} holds {grid.shape[1]} patch "
                           f"positions after {file_prefix} prefix token(s): not a square grid")
    target_prefix = _pos_prefix(backbone)
    if target_prefix == 0 and file_prefix and "cls_token" in state:
        state["cls_token"] = state["cls_token"] + prefix[:, :1]
    padding = prefix.new_zeros(1, max(target_prefix - file_prefix, 0), prefix.shape[-1])
    prefix = torch.cat([prefix[:, :target_prefix], padding], dim=1)
    grid = resample_abs_pos_embed(grid, new_size=target_grid, old_size=[side, side], num_prefix_tokens=0)
    state["pos_embed"] = torch.cat([prefix, grid], dim=1)
    if [side, side] != target_grid:
        adapted.notes.append(f"pos_embed resized from {side}x{side} to {target_grid[0]}x{target_grid[1]} patches")


def _pos_prefix(backbone: nn.Module) -> int:
    """How many prefix tokens (class, registers) have a position in the backbone's pos_embed."""
    return 0 if getattr(backbone, "no_embed_class", False) else int(getattr(backbone, "num_prefix_tokens", 1))


def _is_vit(backbone: nn.Module) -> bool:
    return getattr(backbone, "pos_embed", None) is not None and hasattr(backbone, "patch_embed")


# ---------------------------------------------------------------- names


def _lite0_name(key: str, tensors: Mapping[str, torch.Tensor], blocks: list[str], path: str) -> str:
    parts = key.split(".")
    try:
        if parts[0] != "_blocks":
            return ".".join([LITE0_STEM[parts[0]], *parts[1:]])
        index = int(parts[1])
        table = LITE0_INVERTED if f"_blocks.{index}._expand_conv.weight" in tensors else LITE0_SEPARABLE
        return ".".join(["blocks", blocks[index], table[parts[2]], *parts[3:]])
    except (KeyError, IndexError, ValueError):
        raise WeightsError(f"model.pretrained: {path}: tensor {key} has no place in a timm EfficientNet "
                           f"with {len(blocks)} blocks") from None


def _dinov2_name(key: str) -> str:
    """DINOv2's chunked blocks and SwiGLU names -> timm's."""
    key = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key)
    return re.sub(r"^(blocks\.\d+\.mlp\.)w12\.", r"\1fc1.", re.sub(r"^(blocks\.\d+\.mlp\.)w3\.", r"\1fc2.", key))


def _classifier_prefixes(backbone: nn.Module) -> tuple[str, ...]:
    pretrained_cfg = cast(dict[str, Any], getattr(backbone, "pretrained_cfg", None) or {})
    classifiers = pretrained_cfg.get("classifier") or ()
    return tuple(f"{name}." for name in ([classifiers] if isinstance(classifiers, str) else classifiers))


# ---------------------------------------------------------------- the fit check


def check_fit(adapted: Adapted, backbone: nn.Module, path: str) -> None:
    """Every backbone tensor given (or fresh on purpose), nothing extra, every shape equal; else one error."""
    problems = key_problems(backbone.state_dict(), adapted.state_dict, adapted.fresh, adapted.sources)
    if problems:
        raise WeightsError(f"model.pretrained: {path} ({adapted.format}) does not fit model.backbone "
                           f"{type(backbone).__name__}: {problems}")


def key_problems(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor],
                 fresh: list[str] | tuple[str, ...] = (), sources: Mapping[str, str] | None = None) -> str:
    """Missing, unexpected and misshapen tensors (file name first where it differs), or '' if none."""
    sources = sources or {}

    def named(key: str) -> str:
        return f"{sources[key]} (as {key})" if key in sources else key

    missing = [key for key in expected if key not in given and key not in fresh]
    unexpected = [named(key) for key in given if key not in expected]
    misshapen = [f"{named(key)} {tuple(given[key].shape)} vs {tuple(value.shape)}" for key, value in expected.items()
                 if key in given and given[key].shape != value.shape]
    if not (missing or unexpected or misshapen):
        return ""
    return (f"missing keys {abridge(missing)}; unexpected keys {abridge(unexpected)}; "
            f"shape mismatches (file vs model) {abridge(misshapen)}")


def abridge(keys: list[str], shown: int = 8) -> str:
    more = f" (+{len(keys) - shown} more)" if len(keys) > shown else ""
    return (", ".join(keys[:shown]) or "none") + more


def _describe(checkpoint: Any) -> str:
    if not isinstance(checkpoint, Mapping):
        return f"a {type(checkpoint).__name__}, not a mapping"
    if not checkpoint:
        return "an empty mapping"
    return f"top-level keys {abridge([str(key) for key in checkpoint], 5)}"
