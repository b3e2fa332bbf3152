"""What the model looks at: class-activation maps of the referable-glaucoma logit, drawn over the image.

A screening model that scores well can still be right for the wrong reason (a camera's border, a
vignette, the eye's side). A map of where the RG logit comes from lets a grader check that it looks at
the optic disc. The maps are the `grad-cam` library's (Grad-CAM by default), not hooks of our own: it
is maintained, tested against the papers, and its ViT route (a `reshape_transform` turning tokens into
a grid) is the accepted one.

The target layer is chosen per architecture: for a CNN the last child of the backbone whose output is
still a spatial map (timm's last conv stage, or its head conv + norm), preferring one wider than 1x1 so a
tiny input does not give a constant map; for a ViT Grad-CAM takes the last block's `norm1`, its patch
tokens reshaped to the patch grid. A ViT's default map is attention-based instead: attention rollout
(Abnar & Zuidema 2020) through every block, read from what the pooled feature attends to (the class
token's row, or the mean patch row under average pooling). The grad-cam library has no rollout, so
it is written here (`attention_rollout`, a dozen lines over timm's own attention modules).

Maps are computed on exactly the tensor the model scores (the evaluation decoder's resize, CLAHE and
normalisation), so they show what it saw; `to_rgb` undoes only the normalisation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus  # type: ignore[import-untyped]
from pytorch_grad_cam.utils.image import show_cam_on_image  # type: ignore[import-untyped]
from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget  # type: ignore[import-untyped]
from torch import nn

METHODS = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus}
"""The CAM methods offered, by name; both are gradient-weighted, so they follow the RG logit's sign."""
ROLLOUT = "rollout"
"""Attention rollout (ViTs only): not class-specific, but what the attention that forms the feature sees."""

Reshape = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Target:
    """The layer a map is taken at, its dotted name (for logs and the bench), and the ViT token reshape."""

    layer: nn.Module
    name: str
    reshape: Reshape | None = None


def _backbone(model: nn.Module) -> Any:
    """GlaucomaNet's timm backbone, or the model itself (a hand-made one in tests); typed Any, as timm's
    attributes (blocks, patch_embed, num_prefix_tokens) are beyond nn.Module's types."""
    backbone = getattr(model, "backbone", None)
    return backbone if isinstance(backbone, nn.Module) else model


def _prefix(model: nn.Module, backbone: nn.Module) -> str:
    return "backbone." if backbone is not model else ""


def find_target(model: nn.Module, images: torch.Tensor, name: str | None = None) -> Target:
    """The layer to explain `model` at on inputs shaped like `images` (or the module called `name`)."""
    backbone = _backbone(model)
    if name is not None:
        return Target(model.get_submodule(name), name, _vit_reshape(backbone) if _is_vit(backbone) else None)
    if _is_vit(backbone):
        blocks = backbone.blocks
        return Target(blocks[-1].norm1, f"{_prefix(model, backbone)}blocks.{len(blocks) - 1}.norm1",
                      _vit_reshape(backbone))
    child = _last_spatial_child(model, backbone, images[:1])
    return Target(getattr(backbone, child), _prefix(model, backbone) + child)


def _is_vit(backbone: nn.Module) -> bool:
    return hasattr(backbone, "patch_embed") and hasattr(backbone, "blocks") and hasattr(backbone, "num_prefix_tokens")


def _vit_reshape(backbone: Any) -> Reshape:
    """Tokens [B, prefix + gh*gw, C] to a map [B, C, gh, gw], dropping the class/register tokens.

    The grid is the patch embedding's when the token count fits it; a ViT fed another size than it was
    built for (timm's dynamic image size) has a square grid here, as our inputs are square.
    """
    prefix = int(backbone.num_prefix_tokens)
    grid = tuple(getattr(backbone.patch_embed, "grid_size", None) or ())

    def reshape(tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, prefix:, :]
        count = patches.shape[1]
        rows, cols = grid if len(grid) == 2 and grid[0] * grid[1] == count else (math.isqrt(count),) * 2
        return patches.reshape(tokens.shape[0], rows, cols, tokens.shape[2]).permute(0, 3, 1, 2)

    return reshape


def _last_spatial_child(model: nn.Module, backbone: nn.Module, probe: torch.Tensor) -> str:
    """The backbone's last direct child (in execution order) that outputs a 4-D map, wider than 1x1 if any is."""
    shapes: dict[str, tuple[int, ...]] = {}
    handles = [child.register_forward_hook(_recorder(shapes, child_name))
               for child_name, child in backbone.named_children()]
    try:
        with torch.no_grad():
            model(probe)
    finally:
        for handle in handles:
            handle.remove()
    spatial = [child_name for child_name, shape in shapes.items() if len(shape) == 4]
    if not spatial:
        raise ValueError(f"{type(backbone).__name__}: no layer outputs a spatial map to explain")
    wide = [child_name for child_name in spatial if min(shapes[child_name][2:]) > 1]
    return (wide or spatial)[-1]


def _recorder(shapes: dict[str, tuple[int, ...]], child_name: str) -> Callable[..., None]:
    def record(_module: nn.Module, _inputs: object, output: object) -> None:
        if isinstance(output, torch.Tensor):
            shapes.pop(child_name, None)
            shapes[child_name] = tuple(output.shape)  # re-inserted: the dict's order is the execution order

    return record


def cam_maps(model: nn.Module, images: torch.Tensor, layer: str | None = None, method: str | None = None) -> np.ndarray:
    """Maps [N, H, W] in [0, 1] (each image's own min-max) of where the RG logit of `images` comes from.

    `images` is the normalised batch the model scores; `layer` a dotted module name to override the choice;
    `method` one of METHODS or ROLLOUT (default: rollout for ViTs without a `layer`, else Grad-CAM).
    """
    vit = _is_vit(_backbone(model))
    method = method or (ROLLOUT if vit and layer is None else "gradcam")
    if method == ROLLOUT:
        if not vit:
            raise ValueError(f"{type(_backbone(model)).__name__}: attention rollout needs a ViT backbone")
        return attention_rollout(model, images)
    target = find_target(model, images, layer)
    was_training = model.training
    try:
        with torch.enable_grad(), METHODS[method](model, [target.layer], target.reshape) as cam:
            maps = cam(images, targets=[BinaryClassifierOutputTarget(1)] * len(images))
    finally:
        model.train(was_training)
    return np.nan_to_num(np.asarray(maps, dtype=np.float32)).clip(0, 1)


def attention_rollout(model: nn.Module, images: torch.Tensor) -> np.ndarray:
    """Rollout maps [N, H, W] in [0, 1]: `rollout_grid` upsampled to the image and min-max scaled per image."""
    maps = nn.functional.interpolate(rollout_grid(model, images).unsqueeze(1), size=images.shape[-2:],
                                     mode="bilinear", align_corners=False)[:, 0]
    low = maps.amin(dim=(1, 2), keepdim=True)
    span = (maps.amax(dim=(1, 2), keepdim=True) - low).clamp_min(1e-12)
    return ((maps - low) / span).numpy().astype(np.float32)


def rollout_grid(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The pooled feature's rollout over the patch grid [N, gh, gw]: per block the head-averaged attention
    with the residual, (A + I) / 2, rows renormalised, multiplied from the first block up."""
    backbone = _backbone(model)
    layers = attention_matrices(model, images)
    tokens = layers[0].shape[-1]
    eye = torch.eye(tokens, dtype=layers[0].dtype)
    rollout = eye.expand(len(images), tokens, tokens)
    for attention in layers:
        mixed = 0.5 * attention.mean(dim=1) + 0.5 * eye
        rollout = (mixed / mixed.sum(dim=-1, keepdim=True)) @ rollout
    prefix = int(backbone.num_prefix_tokens)
    pooled_row = rollout[:, prefix:].mean(dim=1) if getattr(backbone, "global_pool", "token") == "avg" \
        else rollout[:, 0]
    return _vit_reshape(backbone)(pooled_row.unsqueeze(-1))[:, 0]


def attention_matrices(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Every block's softmax attention [N, heads, T, T], from timm's unfused attention path (the fused kernel
    never materialises it), captured at its `attn_drop` (identity in eval mode)."""
    captured: list[torch.Tensor] = []
    modules = [block.attn for block in _backbone(model).blocks]
    fused = [module.fused_attn for module in modules]
    handles = [module.attn_drop.register_forward_hook(lambda _m, _i, out: captured.append(out.detach().float()))
               for module in modules]
    was_training = model.training
    try:
        for module in modules:
            module.fused_attn = False
        with torch.no_grad():
            model.eval()(images)
    finally:
        for module, flag, handle in zip(modules, fused, handles, strict=True):
            module.fused_attn = flag
            handle.remove()
        model.train(was_training)
    return captured


def to_rgb(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """The normalised batch [N, 3, H, W] back to the 8-bit pictures [N, H, W, 3] the model saw."""
    pixels = images.detach().cpu().float() * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    return (pixels.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def overlay(rgb: np.ndarray, cam: np.ndarray, image_weight: float = 0.55) -> np.ndarray:
    """The map as a jet heat map blended over the image (uint8 HxWx3), the library's way."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[:2] != cam.shape:
        raise ValueError(f"overlay: expected an HxWx3 uint8 image and an HxW map, got {rgb.dtype} {rgb.shape} "
                         f"and {cam.shape}")
    return show_cam_on_image(rgb.astype(np.float32) / 255, cam.astype(np.float32), use_rgb=True,
                             image_weight=image_weight)


def side_by_side(rgb: np.ndarray, cam: np.ndarray, display: int = 192) -> Image.Image:
    """The image and its overlay next to each other, enlarged to `display` px each so a 64 px input is legible."""
    pair = np.concatenate([rgb, overlay(rgb, cam)], axis=1)
    return Image.fromarray(pair).resize((2 * display, display), Image.Resampling.NEAREST)


def write_overlays(model: nn.Module, images: torch.Tensor, keys: list[str], out_dir: Path,
                   mean: tuple[float, ...], std: tuple[float, ...]) -> list[Path]:
    """One PNG per image (`out_dir/<key>.png`, nested keys in folders): what predict.py --explain writes."""
    maps = cam_maps(model, images)
    written = []
    for key, rgb, cam in zip(keys, to_rgb(images, mean, std), maps):
        path = Path(out_dir) / f"{key}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        side_by_side(rgb, cam).save(path)
        written.append(path)
    return written


def mass_inside_circle(cam: np.ndarray, centre: tuple[float, float], radius: float) -> float:
    """The share of the map's mass inside a circle given in fractions of the map's width (x, y, radius)."""
    height, width = cam.shape
    ys, xs = np.mgrid[0:height, 0:width]
    inside = np.hypot((xs + 0.5) / width - centre[0], (ys + 0.5) / width - centre[1]) <= radius
    total = float(cam.sum())
    return float(cam[inside].sum()) / total if total > 0 else float("nan")
