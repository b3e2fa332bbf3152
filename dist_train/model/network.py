"""The glaucoma classifier: a timm backbone (features out) plus a small dense head giving one logit.

Everything the model needs at build time lives here: the backbone factory (by timm name, with a
close-match suggestion when the name is wrong), pretrained weights from a local file or the local
timm/Hugging Face cache only (never the network, never a silent random init), the head and its
initialisation, the no-weight-decay rule, device placement, and loading an exported model for
inference without any distributed machinery.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import pickle
from pathlib import Path
from typing import Any, TypeVar, cast

import timm
import torch
from safetensors.torch import load_file
from torch import nn

from dist_train.config import ModelConfig, section_from_dict
from dist_train.errors import WeightsError, first_line

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
"""File endings accepted by `model.pretrained` as a local weight file."""

HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
"""Files looked for in a cached Hugging Face repository, in timm's order of preference."""

ModuleT = TypeVar("ModuleT", bound=nn.Module)


class GlaucomaNet(nn.Module):
    """Backbone features -> dense head -> one logit per image."""

    backbone: Any
    """A timm model: num_features, no_weight_decay() and pretrained_cfg are timm's, beyond nn.Module's types."""
    head: nn.Sequential

    def __init__(self, backbone: nn.Module, head: nn.Sequential):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of shape [B] (squeezed on the last axis only, so a batch of one stays 1-D)."""
        return self.head(self.backbone(images)).squeeze(-1)

    @property
    def data_config(self) -> dict[str, tuple[float, ...]]:
        """The backbone's normalisation (mean, std), as timm resolves it for its pretrained weights."""
        resolved = timm.data.resolve_data_config({}, model=self.backbone)
        return {"mean": tuple(resolved["mean"]), "std": tuple(resolved["std"])}


def build_model(cfg: ModelConfig) -> GlaucomaNet:
    """The model described by `cfg`, with `cfg.pretrained` weights loaded (or an error saying why not)."""
    backbone = _create_backbone(cfg)
    model = GlaucomaNet(backbone, build_head(cast(int, backbone.num_features), cfg))
    if _is_weight_file(cfg.pretrained):
        load_weight_file(model, cfg.pretrained)
    return model


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


def _create_backbone(cfg: ModelConfig) -> nn.Module:
    check_backbone_name(cfg.backbone)
    kwargs: dict[str, Any] = {"num_classes": 0, "drop_rate": cfg.drop_rate}
    if cfg.pretrained == "none" or _is_weight_file(cfg.pretrained):
        return timm.create_model(cfg.backbone, pretrained=False, **kwargs)
    cached = resolve_cached_pretrained(cfg.pretrained)
    overlay = {"file": cached}
    try:
        return timm.create_model(cfg.backbone, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except (RuntimeError, KeyError, ValueError) as error:
        raise WeightsError(f"model.pretrained: the cached weights of {cfg.pretrained!r} ({cached}) do not fit "
                         f"model.backbone {cfg.backbone!r}: {first_line(error)}") from None


def check_backbone_name(name: str) -> None:
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; close timm names: {', '.join(close)}" if close else "; see timm.list_models()"
    raise ValueError(f"model.backbone: {name!r} is not a timm model{hint}")


def check_pretrained(pretrained: str) -> None:
    """Raise WeightsError now, before a run starts, if `model.pretrained` names nothing loadable and safe."""
    if pretrained == "none":
        return
    if _is_weight_file(pretrained):
        read_state_dict(pretrained)
    else:
        resolve_cached_pretrained(pretrained)


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
    """Load a local file: a whole GlaucomaNet ('backbone.*'/'head.*' keys) or the backbone alone.

    Strict: every missing, unexpected or misshapen key is named in the error, except the timm
    classifier of the file's source model, which a features-only backbone does not have.
    """
    state_dict = read_state_dict(path)
    target: nn.Module
    if any(key.startswith("backbone.") for key in state_dict):
        target, keys = model, state_dict
    else:
        target, keys = model.backbone, _drop_classifier(model.backbone, state_dict)
    problems = _key_problems(target.state_dict(), keys)
    if problems:
        raise WeightsError(f"model.pretrained: {path} does not fit model.backbone "
                         f"{type(model.backbone).__name__}: {problems}")
    target.load_state_dict(keys, strict=True)


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors or weights-only torch file; a pickled payload with code is refused.

    timm's own reader (weights_only): a torch file may wrap its tensors in 'state_dict' or 'model'
    (training checkpoints), and DDP's 'module.' prefix is removed.
    """
    if not Path(path).is_file():
        raise WeightsError(f"model.pretrained: weight file {path} does not exist")
    if path.endswith(".safetensors"):
        return _load_safetensors(path, "model.pretrained")
    try:
        return timm.models.load_state_dict(path, use_ema=False, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as error:  # timm re-raises torch's refusal as RuntimeError
        raise WeightsError(f"model.pretrained: {path} is not a plain weights file (torch.load weights_only "
                         f"refused it: {_refusal_reason(error)}); convert it to .safetensors") from None
    except (AttributeError, TypeError):  # timm's clean_state_dict met something that is not a mapping
        raise WeightsError(f"model.pretrained: {path} holds no state dict (a mapping of names to tensors, "
                         f"possibly under 'state_dict' or 'model')") from None


def _load_safetensors(path: str, option: str) -> dict[str, torch.Tensor]:
    """A .safetensors file, or an error naming it (a pickle renamed to .safetensors lands here too)."""
    try:
        return load_file(path)
    except Exception as error:  # safetensors raises its own SafetensorError, not an OSError
        raise WeightsError(f"{option}: {path} is not a valid .safetensors file ({first_line(error)})") from None


def _key_problems(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> str:
    missing = [key for key in expected if key not in given]
    unexpected = [key for key in given if key not in expected]
    misshapen = [f"{key} {tuple(given[key].shape)} vs {tuple(value.shape)}" for key, value in expected.items()
                 if key in given and given[key].shape != value.shape]
    if not (missing or unexpected or misshapen):
        return ""
    return (f"missing keys {_abridge(missing)}; unexpected keys {_abridge(unexpected)}; "
            f"shape mismatches (file vs model) {_abridge(misshapen)}")


def _drop_classifier(backbone: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    classifiers = cast(dict[str, Any], backbone.pretrained_cfg).get("classifier") or ()
    prefixes = tuple(f"{name}." for name in ([classifiers] if isinstance(classifiers, str) else classifiers))
    own = backbone.state_dict()
    return {key: value for key, value in state_dict.items() if key in own or not key.startswith(prefixes)}


def _abridge(keys: list[str], shown: int = 8) -> str:
    more = f" (+{len(keys) - shown} more)" if len(keys) > shown else ""
    return (", ".join(keys[:shown]) or "none") + more


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
    model = build_model(cfg)
    model.load_state_dict(_load_safetensors(str(weights), "--model"), strict=True)
    return model.eval(), meta


def _model_config_from_dict(raw: Any, source: Path) -> ModelConfig:
    """The export's model config, checked as a YAML file's `model:` section is (types, ranges, unknown keys)."""
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: 'model' must be the model config as a mapping")
    cfg = section_from_dict(ModelConfig, raw, str(source), "model")
    return dataclasses.replace(cfg, pretrained="none", compile=False)
