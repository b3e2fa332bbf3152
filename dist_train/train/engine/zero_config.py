"""The DeepSpeed config, generated from ours; a user DeepSpeed file that contradicts ours is refused.

Ours decides what DDP and DeepSpeed must agree on: batch sizes, ZeRO stage, precision and clipping.
A user file (`engine.deepspeed_config`) is merged under it for DeepSpeed's other knobs; a setting of
the file that ours would override is refused in one line instead of being silently dropped.

Precision is DeepSpeed's `torch_autocast` section, not its `bf16`/`fp16` modes. Those cast the
module's weights to 16 bits: the forward then needs 16-bit inputs, and evaluation and export, which
run the plain module on fp32 images, fail ("Input type (torch.FloatTensor) and weight type
(CPUBFloat16Type) should be the same", on CPU as on GPU). `torch_autocast` keeps fp32 master
weights and BatchNorm and autocasts the forward, as DDP does; for fp16 DeepSpeed adds torch's dynamic
GradScaler, the loss scaling fp16 needs. Only ZeRO-0 uses it correctly: ZeRO 1-2 (DeepSpeed 0.19.8)
find an overflow through the gradient norm and skip the step without telling the GradScaler, so the
scale never drops and every later step overflows and is skipped too; fp16 with ZeRO 1-2 is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeGuard

import yaml

from dist_train.config import Config, ConfigError
from dist_train.errors import one_line
from dist_train.train.distributed import DistEnv

AUTOCAST_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}
"""train.precision -> the dtype of the generated torch_autocast section (fp32: autocast off)."""
NATIVE_SECTIONS = {"fp16": "fp16", "bf16": "bf16", "bfloat16": "bf16"}
"""DeepSpeed's own mixed-precision modes (16-bit weights), by section name, and the precision each means."""
DTYPE_NAMES = {name: precision for precision, names in {
    "fp16": ("fp16", "float16", "half", "torch.float16"),
    "bf16": ("bf16", "bfloat16", "torch.bfloat16"),
    "fp32": ("fp32", "float32", "float", "torch.float32"),
}.items() for name in names}
"""The dtype spellings DeepSpeed accepts in torch_autocast.dtype (its DtypeEnum), as train.precision values."""


def deepspeed_config(cfg: Config, env: DistEnv) -> dict[str, Any]:
    """The DeepSpeed JSON config: the user file (checked) under the settings generated from ours."""
    ds = _checked(cfg)
    ds.update({
        "train_micro_batch_size_per_gpu": cfg.train.batch_size,
        "gradient_accumulation_steps": cfg.train.accumulation_steps,
        "train_batch_size": cfg.train.batch_size * cfg.train.accumulation_steps * env.world_size,
        "zero_optimization": {**ds.get("zero_optimization", {}), "stage": cfg.engine.zero_stage},
        "torch_autocast": autocast_section(cfg, ds.get("torch_autocast", {})),
        "gradient_clipping": _clip(cfg),  # DeepSpeed clips at 1.0 unless told; DDP only when optim.grad_clip is set
        "steps_per_print": 1 << 30,
        "zero_allow_untested_optimizer": True,  # our client optimizers are torch's own SGD/Adam/AdamW
        "wall_clock_breakdown": False,
    })
    return ds


def autocast_section(cfg: Config, user: dict[str, Any]) -> dict[str, Any]:
    """train.precision as DeepSpeed's torch_autocast section (the user's other keys of it kept)."""
    section = {key: value for key, value in user.items() if key not in ("enabled", "dtype")}
    dtype = AUTOCAST_DTYPES.get(cfg.train.precision)
    return {**section, "enabled": True, "dtype": dtype} if dtype else {**section, "enabled": False}


def _clip(cfg: Config) -> float:
    """DeepSpeed's gradient_clipping for optim.grad_clip (0.0 turns DeepSpeed's clipping off)."""
    return 0.0 if cfg.optim.grad_clip is None else float(cfg.optim.grad_clip)


def check_deepspeed_file(cfg: Config, source: str = "config") -> None:
    """Refuse DeepSpeed settings we cannot honour: fp16 with ZeRO 1-2, an unreadable engine.deepspeed_config,
    or one whose precision or clipping contradicts ours.

    Raises ConfigError naming both settings (`source`: where cfg came from); the preflight calls it before
    any rank starts (DDP runs pass), and the engine again before DeepSpeed is initialised."""
    if cfg.engine.kind == "deepspeed":
        _checked(cfg, source)


def _checked(cfg: Config, source: str = "config") -> dict[str, Any]:
    """The user file's settings, once the DeepSpeed side of cfg and the file are known to be honourable."""
    if cfg.train.precision == "fp16" and cfg.engine.zero_stage > 0:
        raise ConfigError(source, "engine.zero_stage", f"{cfg.engine.zero_stage} with train.precision=fp16: "
                          f"DeepSpeed's ZeRO 1-2 never lower the fp16 loss scale after an overflow, so training "
                          f"stalls; use train.precision=bf16, engine.zero_stage=0 or engine.kind=ddp")
    path = cfg.engine.deepspeed_config
    if not path:
        return {}
    user = _read_user_file(path)
    for key, precision in _precisions_in(path, user):
        _check_precision(path, key, precision, cfg.train.precision)
    clip = user.get("gradient_clipping")
    if clip is not None and clip != _clip(cfg):
        raise ConfigError(path, "gradient_clipping", f"{clip} contradicts optim.grad_clip={cfg.optim.grad_clip}; set "
                                                     f"optim.grad_clip instead (unset: no clipping) and remove it here")
    _check_layout(path, user, cfg)
    return user


def _check_layout(path: str, user: dict[str, Any], cfg: Config) -> None:
    """The batch sizes and ZeRO stage are ours (DDP must train the same batches): the file may only repeat them."""
    zero = user.get("zero_optimization")
    given = {"train_micro_batch_size_per_gpu": (user.get("train_micro_batch_size_per_gpu"), "train.batch_size",
                                                cfg.train.batch_size),
             "gradient_accumulation_steps": (user.get("gradient_accumulation_steps"), "train.accumulation_steps",
                                             cfg.train.accumulation_steps),
             "zero_optimization.stage": (zero.get("stage") if isinstance(zero, dict) else None, "engine.zero_stage",
                                         cfg.engine.zero_stage)}
    for key, (value, name, ours) in given.items():
        if value is not None and value != ours:
            raise ConfigError(path, key, f"{value} contradicts {name}={ours}; set {name} instead and remove it here")
    if "train_batch_size" in user:
        raise ConfigError(path, "train_batch_size", f"{user['train_batch_size']} is set by dist_train (train.batch_size"
                          " x train.accumulation_steps x ranks, so it follows the world size); remove it here")


def _read_user_file(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
        user = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as error:
        raise ConfigError(path, "", f"engine.deepspeed_config cannot be read ({one_line(error)}); "
                                    f"give a DeepSpeed JSON or YAML file") from None
    if not isinstance(user, dict):
        raise ConfigError(path, "", "engine.deepspeed_config must hold a mapping of DeepSpeed settings")
    return user


def _precisions_in(path: str, user: dict[str, Any]) -> list[tuple[str, str]]:
    """(the file's key, the precision it enables) for every precision section the file enables."""
    found = [(f"{name}.enabled", precision) for name, precision in NATIVE_SECTIONS.items()
             if _enabled(user.get(name))]
    autocast = user.get("torch_autocast")
    if _enabled(autocast):
        dtype = str(autocast.get("dtype"))
        if dtype not in DTYPE_NAMES:
            raise ConfigError(path, "torch_autocast.dtype", f"{dtype!r} is not a dtype DeepSpeed autocasts to; "
                                                            f"remove the section and set train.precision instead")
        found.append(("torch_autocast.dtype", DTYPE_NAMES[dtype]))
    return found


def _enabled(section: Any) -> TypeGuard[dict[str, Any]]:
    return isinstance(section, dict) and bool(section.get("enabled"))


def _check_precision(path: str, key: str, precision: str, ours: str) -> None:
    if precision != ours:
        raise ConfigError(path, key, f"asks for {precision}, which contradicts train.precision={ours}; set "
                                     f"train.precision (the DeepSpeed precision section is generated from it)")
    if key.split(".")[0] in NATIVE_SECTIONS:
        raise ConfigError(path, key, f"DeepSpeed's own {precision} mode casts the weights to 16 bits, which "
                                     f"evaluation and export cannot run; remove the section: train.precision="
                                     f"{ours} already trains in {ours} under DeepSpeed's torch_autocast")
