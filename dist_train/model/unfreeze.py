"""Layer-wise unfreezing: which parameters train in each phase (the optimizer and its LR schedule: optim.py).

Units of unfreezing, always counted from the OUTPUT end of the network:

- a *layer* is a module that owns parameters directly (`named_parameters(recurse=False)` is not
  empty): Conv, Linear, BatchNorm, timm's BatchNormAct2d, a ViT's root (cls_token, pos_embed), ...
  Layers are ordered by module registration order (`named_modules()`), which for timm's CNNs is the
  forward order; the head's layers come last.
- a *block* is one of timm's coarse parameter groups of the backbone
  (`group_parameters(backbone, backbone.group_matcher(coarse=True))`: stem, one per stage; the
  final conv of an EfficientNet joins the last stage; a ViT: embeddings, then one per transformer
  block, the final `norm` or `fc_norm` joining the last), followed by our head as its own block.

Phase specs (`unfreeze.phases[i].train`):

- `head`: only our `.head` trains;
- `all`: everything trains;
- `last_N_layers`: the head plus the last N *backbone* layers (N larger than the backbone trains all);
- `last_N_blocks`: the head plus the last N *backbone* blocks.

N counts backbone units because the head always trains: `last_1_blocks` is "the last stage and
the head", not "the head alone", which `head` already says.

How phases run, and why the optimizer is never rebuilt, is in docs/UNFREEZE.md. In short: every
parameter is in the one optimizer from the start, grouped by the phase in which it first trains;
a frozen parameter has `requires_grad=False`, hence no gradient, and torch's optimizers skip it
entirely (no weight decay, no momentum, no state). Its state appears at its first real step.
"""

from __future__ import annotations

import bisect
from typing import Any, cast

from timm.models import group_parameters
from torch import nn

from dist_train import compat
from dist_train.config import PhaseConfig, UnfreezeConfig

NEVER = -1
"""Phase index of the parameter group that no phase trains (lr 0)."""


def unwrap(model: nn.Module) -> nn.Module:
    """The GlaucomaNet inside DDP / DeepSpeed (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if compat.unwrap_compiled(model) is not model:
            model = compat.unwrap_compiled(model)
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = cast(nn.Module, model.module)
        else:
            return model


# ---------------------------------------------------------------- layers, blocks and specs


def layers(model: nn.Module) -> list[tuple[str, list[str]]]:
    """(module name, full names of the parameters it owns directly), in registration order."""
    seen: set[int] = set()
    found = []
    for module_name, module in unwrap(model).named_modules():
        prefix = f"{module_name}." if module_name else ""
        names = []
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                names.append(prefix + param_name)
        if names:
            found.append((module_name, names))
    return found


def backbone_layers(model: nn.Module) -> list[tuple[str, list[str]]]:
    return [layer for layer in layers(model) if layer[0] == "backbone" or layer[0].startswith("backbone.")]


def blocks(model: nn.Module) -> list[list[str]]:
    """Full parameter names per block: timm's coarse groups of the backbone, then the head."""
    model = unwrap(model)
    backbone = cast(Any, model.backbone)  # a timm model: group_matcher is timm's, beyond nn.Module's types
    if not hasattr(backbone, "group_matcher"):
        raise ValueError(f"unfreeze: {type(backbone).__name__} has no timm group_matcher, so "
                         "last_N_blocks is undefined for it; use last_N_layers")
    groups = group_parameters(backbone, join_unmatched(backbone.group_matcher(coarse=True)))
    backbone_blocks = [[f"backbone.{name}" for name in groups[index]] for index in sorted(groups)]
    return backbone_blocks + [sorted(head_names(model))]


JOIN_PREVIOUS = (99999,)
"""timm's MATCH_PREV_GROUP: a group_matcher suffix that puts its parameters into the group before them."""


def join_unmatched(matcher: Any) -> Any:
    """A timm group_matcher whose unmatched parameters join the last group instead of forming their own.

    timm gives the parameters its matcher names in no group a group of their own at the top, meant for
    its classifier (they train at the head's LR under layer decay). With the classifier removed
    (num_classes=0), what is left there is the last norm of the trunk (a ViT's `fc_norm` under avg
    pooling), so for unfreezing it belongs to the last block, as timm's matcher already says of `norm`
    (MATCH_PREV_GROUP); otherwise `last_1_blocks` would train fc_norm and no transformer block. A
    callable matcher is returned as it is.
    """
    if not isinstance(matcher, dict):
        return matcher
    return {**matcher, "_unmatched_join_last": [(r".", JOIN_PREVIOUS)]}


def timm_unmatched(backbone: nn.Module, matcher: Any) -> set[str]:
    """Backbone parameter names `matcher` puts in no group (timm's top group: classifier, fc_norm, a neck)."""
    plain = group_parameters(backbone, matcher, reverse=True)
    joined = group_parameters(backbone, join_unmatched(matcher), reverse=True)
    return {name for name, layer in plain.items() if joined[name] != layer}


def head_names(model: nn.Module) -> set[str]:
    return {f"head.{name}" for name, _ in cast(nn.Module, unwrap(model).head).named_parameters()}


def parse_spec(spec: str) -> tuple[str, int]:
    """('head' | 'all', 0) or ('layers' | 'blocks', N) for 'last_N_layers' / 'last_N_blocks'."""
    if spec in ("head", "all"):
        return spec, 0
    parts = spec.split("_")
    if len(parts) == 3 and parts[0] == "last" and parts[1].isdigit() and parts[2] in ("layers", "blocks"):
        return parts[2], int(parts[1])
    raise ValueError(f"unfreeze: train spec {spec!r} must be head, all, last_N_layers or last_N_blocks")


def trainable_names(model: nn.Module, spec: str) -> set[str]:
    """Full names of the parameters that train under `spec` (see the module docstring)."""
    model = unwrap(model)
    kind, count = parse_spec(spec)
    if kind == "all":
        return {name for name, _ in model.named_parameters()}
    chosen = head_names(model)
    if kind == "layers" and count:
        for _, names in backbone_layers(model)[-count:]:
            chosen.update(names)
    if kind == "blocks" and count:
        for names in blocks(model)[:-1][-count:]:
            chosen.update(names)
    return chosen


# ---------------------------------------------------------------- the phase schedule


class UnfreezeSchedule:
    """Which parameters train in which phase; switches `requires_grad` and BatchNorm modes in place.

    Modules are never replaced (unlike timm.utils.freeze, which swaps BatchNorm for a frozen copy),
    so an optimizer or checkpoint built before a phase change still holds the live parameters.
    """

    def __init__(self, cfg: UnfreezeConfig, model: nn.Module):
        self.cfg = cfg
        self.phases: list[PhaseConfig] = list(cfg.phases)
        self.phase_trainable = [frozenset(trainable_names(model, phase.train)) for phase in self.phases]
        self.current: int | None = None

    def phase_index_at(self, epoch: int) -> int:
        """Index of the phase that runs during `epoch` (0-based)."""
        return phase_index_at(self.phases, epoch)

    def first_phase_of(self, name: str) -> int:
        """The first phase in which parameter `name` trains, or NEVER (-1)."""
        return next((index for index, names in enumerate(self.phase_trainable) if name in names), NEVER)

    def trainable(self, phase_index: int | None = None) -> frozenset[str]:
        """Parameter names trainable in `phase_index` (default: the phase last applied)."""
        index = self.current if phase_index is None else phase_index
        if index is None:
            raise RuntimeError("UnfreezeSchedule: no phase applied yet; call apply(model, phase_index)")
        return self.phase_trainable[index]

    def apply(self, model: nn.Module, phase_index: int) -> dict[str, Any]:
        """Enter `phase_index`: `requires_grad` on exactly its parameters, so frozen ones cost no backward.

        Both engines call it; DeepSpeed after registering every parameter as trainable at init (zero.py).
        """
        self.current = phase_index
        trainable = self.phase_trainable[phase_index]
        count = 0
        for name, param in unwrap(model).named_parameters():
            param.requires_grad_(name in trainable)
            count += param.numel() if name in trainable else 0
        phase = self.phases[phase_index]
        return {"phase": phase_index, "train": phase.train, "trainable_params": count,
                "from_epoch": phase.from_epoch}

    def set_train_mode(self, model: nn.Module) -> None:
        """`model.train()`, then frozen BatchNorm layers back to eval (running statistics untouched).

        A frozen BN in train mode would still normalise with batch statistics and overwrite the
        running ones the pretrained weights rely on. BN layers without affine parameters are not
        known to be frozen and follow train mode.
        """
        model.train()
        if not self.cfg.frozen_bn_eval:
            return
        trainable = self.trainable()
        for module_name, module in unwrap(model).named_modules():
            is_norm = compat.is_batchnorm(module)
            if is_norm and _owns_only_frozen(module_name, module, trainable):
                module.eval()


def phase_index_at(phases: list[PhaseConfig], epoch: int) -> int:
    starts = [phase.from_epoch for phase in phases]
    return max(bisect.bisect_right(starts, epoch) - 1, 0)


def _owns_only_frozen(module_name: str, module: nn.Module, trainable: frozenset[str]) -> bool:
    prefix = f"{module_name}." if module_name else ""
    names = [prefix + name for name, _ in module.named_parameters(recurse=False)]
    return bool(names) and not any(name in trainable for name in names)
