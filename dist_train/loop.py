"""The training loop, top to bottom: build, resume, then per epoch train, evaluate, checkpoint.

Each part lives in its own module; this file only says in what order they run and what state moves
between them. Rank 0 alone tracks and decides (best checkpoint, early stopping, health); its decisions
reach the other ranks through one broadcast per evaluation.
"""

from __future__ import annotations

import logging
import shutil
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from dist_train import checkpoint, distributed, evaluate, faults, metrics, preemption
from dist_train.augment import Augmenter, Normaliser
from dist_train.config import Config, to_dict
from dist_train.data import (
    Batch,
    DataError,
    Decoder,
    EvalStream,
    StreamPosition,
    TrainStream,
    make_loader,
    shard_preprocessing,
    shard_urls,
    split_counts,
    steps_per_epoch,
    verify_against_manifest,
)
from dist_train.distributed import DistEnv
from dist_train.engine import autocast, build_engine
from dist_train.health import no_positives_message, starved_of_positives, val_loss_rising
from dist_train.losses import build_loss
from dist_train.model import build_model, prepare_model
from dist_train.redact import scrub_secrets
from dist_train.tracking import Tracker
from dist_train.unfreeze import LRSchedule, UnfreezeSchedule, build_optimizer

log = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
    """A health rule or a non-finite loss ended the run; the message says why and what to change."""


@dataclass
class TrainerState:
    """Everything about progress that is not a tensor; saved in every checkpoint."""

    epoch: int = 0
    step: int = 0
    epoch_start_step: int = 0
    phase: int = -1
    best_metric: float | None = None
    best_epoch: int | None = None
    best_checkpoint: str | None = None
    best_record: dict[str, float] | None = None
    evals_without_improvement: int = 0
    epochs_without_positives: int = 0
    first_positive_epoch: int | None = None
    val_loss_history: list[float] = field(default_factory=list)
    phases_ran: list[dict[str, Any]] = field(default_factory=list)
    bad_samples: int = 0
    """The most corrupt training samples seen in one epoch."""
    seen_samples: int = 0
    wall_time_s: float = 0.0


@dataclass
class EpochStats:
    """One epoch's training figures, summed over ranks."""

    loss_sum: float = 0.0
    samples: int = 0
    positives: int = 0
    predicted_positives: int = 0
    true_positives: int = 0


class EpochSums:
    """Per-rank sums kept on the device: adding a micro-batch never waits for the GPU."""

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(5, dtype=torch.float64, device=device)

    def add(self, logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor) -> None:
        predicted, truth = logits.detach() > 0, labels > 0.5
        count = torch.full((), len(labels), dtype=torch.float64, device=self.sums.device)
        self.sums += torch.stack([loss.detach().double() * count, count, truth.sum().double(),
                                  predicted.sum().double(), (predicted & truth).sum().double()])

    def reduced(self, env: DistEnv) -> EpochStats:
        total = distributed.all_reduce_sum(env, self.sums).tolist()
        return EpochStats(total[0], *(int(v) for v in total[1:]))


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv, resume_from: Path | None = None):
        self.cfg, self.env, self.run_dir = cfg, env, cfg.run_dir
        self.started = time.monotonic()
        distributed.seed_everything(cfg.train.seed + env.rank, cfg.train.deterministic)
        self.train_urls = shard_urls(cfg.data.train_shards)
        self.val_urls = shard_urls(cfg.data.val_shards)
        if cfg.data.verify_shards:
            self._verify_shards()
        self.train_counts = split_counts(self.train_urls, cfg.data.manifest, self.run_dir / "cache")
        self.val_counts = split_counts(self.val_urls, cfg.data.manifest, self.run_dir / "cache")
        self.shard_preprocessing = shard_preprocessing(self.train_urls, cfg.data.manifest)
        self.steps_per_epoch = cfg.train.steps_per_epoch or steps_per_epoch(
            self.train_counts.samples, env.world_size, cfg.train.batch_size, cfg.train.accumulation_steps)
        self.model = prepare_model(build_model(cfg.model), cfg.model, env.device)
        self.unfreeze = UnfreezeSchedule(cfg.unfreeze, self.model)
        optimizer = build_optimizer(self.model, self.unfreeze, cfg.optim)
        negatives = self.train_counts.samples - self.train_counts.positives
        self.loss_fn = build_loss(cfg.loss, self.train_counts.positives, negatives)
        self.engine = build_engine(self.model, optimizer, cfg, env, self.unfreeze)
        self.lr_schedule = LRSchedule(self.engine.optimizer, cfg.schedule, cfg.unfreeze.phases,
                                      self.steps_per_epoch, cfg.train.epochs)
        mean, std = tuple(self.model.data_config["mean"]), tuple(self.model.data_config["std"])
        self.normalise = Normaliser(mean, std, env.device)
        self.decoders = self._decoders(mean, std)
        self.state = TrainerState()
        self.position = StreamPosition()
        self.bad_this_epoch: set[tuple[str, str]] = set()
        self.checkpointer = checkpoint.Checkpointer(self.run_dir / "checkpoints", env, self.engine.kind,
                                                    cfg.checkpoint.keep_last)
        saved = self._resume(resume_from) if resume_from else None
        self.wall_base = self.state.wall_time_s
        self.tracker = Tracker(cfg, self.run_dir, env, run_id=saved and saved.get("run_id"),
                               resume_step=self.state.step if saved else None)
        self._announce(resume_from, saved)

    def _verify_shards(self) -> None:
        """Rank 0 hashes every shard once; every rank learns the verdict."""
        problems = verify_against_manifest(self.train_urls + self.val_urls, self.cfg.data.manifest) \
            if self.env.is_main else None
        problems = distributed.broadcast_object(self.env, problems)
        if problems:
            raise DataError(f"shard verification failed for {len(problems)} shard(s): {problems[0]}")

    def _decoders(self, mean: tuple[float, ...], std: tuple[float, ...]) -> dict[str, Decoder]:
        """On a GPU, workers hand over 8-bit images and the GPU normalises; on a CPU, workers normalise."""
        data = self.cfg.data
        clahe = (data.clahe_clip_limit, data.clahe_tile_grid) if data.clahe else None
        in_workers = self.env.device.type != "cuda"
        train = Decoder(data.image_size, mean, std, clahe, Augmenter(data.augment), normalise=in_workers)
        return {"train": train, "eval": Decoder(data.image_size, mean, std, clahe, None, normalise=in_workers)}

    # ------------------------------------------------------------ the run

    def train(self) -> dict[str, Any]:
        """Train from the current state to the last epoch (or an early stop); returns the summary."""
        exit_code = 1
        try:
            for epoch in range(self.state.epoch, self.cfg.train.epochs):
                self._enter_phase(epoch)
                stats = self.train_epoch(epoch)
                stop = self._end_epoch(epoch, stats)
                if stop:
                    break
            exit_code = 0
            return self.summary()
        except preemption.Preempted:
            exit_code = 0
            raise
        finally:
            self.tracker.finish(self.summary(), exit_code=exit_code)
            if self.env.is_main and self.cfg.tracking.html_report:
                self._write_report()

    def _write_report(self) -> None:
        """The self-contained HTML report; a failure here must not fail a finished run."""
        from dist_train.report import write_report

        try:
            write_report([self.run_dir], self.run_dir / "report.html")
        except Exception as error:  # the report is a convenience; the run's files are the record
            log.warning("could not write report.html: %s", error)

    def train_epoch(self, epoch: int) -> EpochStats:
        stats = EpochSums(self.env.device)
        micro_batches = self.steps_per_epoch * self.cfg.train.accumulation_steps
        stream = TrainStream(self.train_urls, self.cfg.data, self.decoders["train"], self.cfg.train.batch_size,
                             self.env.rank, self.env.world_size, self.cfg.train.seed, epoch, micro_batches,
                             self.cfg.data.workers, resume=self.position)
        progress = self.tracker.progress(self.steps_per_epoch, self.state.step - self.state.epoch_start_step,
                                         desc=f"epoch {epoch}")
        self.engine.module.train()
        self.unfreeze.set_train_mode(self.engine.module)
        window_start, window_samples, shown_step = time.monotonic(), 0, self.state.step
        non_finite = torch.zeros((), dtype=torch.bool, device=self.env.device)
        pin_memory = self.cfg.data.pin_memory and self.env.device.type == "cuda"
        for batch in make_loader(stream, self.cfg.data, pin_memory, self.cfg.engine.timeout_s):
            self._count_bad(batch)
            if not batch.keys:
                continue
            images = self.normalise(batch.images.to(self.env.device, non_blocking=True))
            labels = batch.labels.to(self.env.device, non_blocking=True)
            boundary = self.engine.at_boundary
            if boundary:
                self.lr_schedule.step(self.state.step, epoch)
            logits, loss = self.engine.train_micro_step(images, labels, self.loss_fn)
            loss = faults.corrupt_loss(loss, self.state.step + 1)
            non_finite |= ~torch.isfinite(loss)
            self.position.advance(batch)
            stats.add(logits, labels, loss)
            window_samples += len(batch.keys)
            preempted = self._check_window(non_finite) if boundary else False
            if not self.engine.step():
                continue
            self.state.step += 1
            non_finite.zero_()
            if preempted:
                log.warning("preemption notice: checkpointing at step %d", self.state.step)
                self.save_checkpoint()
                raise preemption.Preempted(f"checkpointed at step {self.state.step}")
            if self.state.step % self.cfg.train.log_every_steps == 0:
                rate = window_samples * self.env.world_size / max(time.monotonic() - window_start, 1e-9)
                self._log_train(epoch, float(loss), rate)
                progress.update(self.state.step - shown_step, loss=float(loss), img_s=round(rate, 1))
                window_start, window_samples, shown_step = time.monotonic(), 0, self.state.step
            every = self.cfg.checkpoint.every_steps
            if every and self.state.step % every == 0 and self.state.step - self.state.epoch_start_step < \
                    self.steps_per_epoch:
                self.save_checkpoint()
        if self.state.step > shown_step:
            progress.update(self.state.step - shown_step)
        progress.close()
        return stats.reduced(self.env)

    def _check_window(self, non_finite: torch.Tensor) -> bool:
        """One small all-reduce per optimizer step, before the update is applied.

        A non-finite loss on any rank stops every rank before the bad update reaches the weights; a
        preemption notice on any rank (SLURM signals may reach only some) makes all checkpoint together
        once this step is applied.
        """
        flags = torch.stack([non_finite.double(), torch.tensor(float(preemption.requested()), dtype=torch.float64,
                                                                device=non_finite.device)])
        bad, preempted = (distributed.all_reduce_sum(self.env, flags) > 0).tolist()
        if bad:
            raise TrainingStopped(f"non-finite loss at optimizer step {self.state.step + 1}; the last good and "
                                  f"best checkpoints are untouched. Lower optim.lr or set optim.grad_clip.")
        return bool(preempted)

    def _end_epoch(self, epoch: int, stats: EpochStats) -> bool:
        """Evaluate, pick the best, apply health rules and checkpoint; True when training should stop."""
        self.state.epoch, self.state.epoch_start_step = epoch + 1, self.state.step
        self.position = StreamPosition()
        self.state.seen_samples += stats.samples
        self._check_bad_fraction()
        last = epoch == self.cfg.train.epochs - 1
        decision = {"stop": False, "reason": None, "improved": False}
        if (epoch + 1) % self.cfg.eval.every_epochs == 0 or last:
            record = self.evaluate(epoch, stats)
            decision = self._decide(epoch, stats, record)
            decision = distributed.broadcast_object(self.env, decision)
            if record is not None:
                self.lr_schedule.on_eval(record[self.cfg.eval.metric])
            self._sync_schedule()
        path = self.save_checkpoint()
        if decision["improved"] and self.cfg.checkpoint.keep_best:
            self.state.best_checkpoint = path.name
            self.checkpointer.mark_best(path.name)
        if decision["reason"] and decision["stop"] == "health":
            raise TrainingStopped(decision["reason"])
        if decision["stop"]:
            log.info("early stopping after epoch %d: %s", epoch, decision["reason"])
        return bool(decision["stop"])

    def _sync_schedule(self) -> None:
        """Reduce-on-plateau decides on rank 0's metric; every rank applies rank 0's LRs."""
        state = distributed.broadcast_object(self.env, self.lr_schedule.state_dict())
        self.lr_schedule.load_state_dict(state)

    # ------------------------------------------------------------ evaluation and decisions

    def evaluate(self, epoch: int, train_stats: EpochStats) -> dict[str, Any] | None:
        stream = EvalStream(self.val_urls, self.decoders["eval"], self.cfg.eval.batch_size, self.env.rank,
                            self.env.world_size, self.cfg.data.workers)
        loader = make_loader(stream, self.cfg.data, False, self.cfg.engine.timeout_s)
        local = evaluate.score_stream(self.engine.module, loader,
                                      self.env.device, self.cfg.eval.tta, self.loss_fn,
                                      lambda: autocast(self.cfg, self.env.device), self.normalise)
        merged = evaluate.gather_scores(self.env, local, self.val_counts.samples)
        if merged is None:
            return None
        record = metrics.compute_all(merged.labels, merged.scores, bootstrap=self.cfg.eval.bootstrap)
        record.update(epoch=epoch, val_loss=merged.loss_sum / max(len(merged.keys), 1),
                      predicted_positives=sum(score > 0.5 for score in merged.scores),
                      train_loss=train_stats.loss_sum / max(train_stats.samples, 1),
                      train_recall=train_stats.true_positives / max(train_stats.positives, 1),
                      train_predicted_positives=train_stats.predicted_positives)
        evaluate.write_predictions(self.run_dir / "predictions_val.csv", merged)
        roc_png = self.run_dir / "plots" / f"roc-epoch{epoch:03d}.png"
        roc_png.parent.mkdir(parents=True, exist_ok=True)
        metrics.plot_roc(merged.labels, merged.scores, roc_png)
        self.tracker.log_eval(self.state.step, record, roc_png)
        log.info("epoch %d: alpha %.4f beta %.4f auc %.4f val_loss %.4f", epoch, record["alpha"],
                 record["beta"], record["auc"], record["val_loss"])
        return record

    def _decide(self, epoch: int, stats: EpochStats, record: dict[str, Any] | None) -> dict[str, Any]:
        """Rank 0 only: best metric, early stopping and the training-health rules."""
        if record is None:
            return {}
        state, health = self.state, self.cfg.health
        value = record[self.cfg.eval.metric]
        improved = value == value and (state.best_metric is None or value > state.best_metric)
        if improved:
            state.best_metric, state.best_epoch, state.evals_without_improvement = value, epoch, 0
            state.best_record = {name: record[name] for name in ("alpha", "beta", "auc", "beta_threshold")}
            shutil.copyfile(self.run_dir / "predictions_val.csv", self.run_dir / "predictions_best.csv")
        else:
            state.evals_without_improvement += 1
        if stats.predicted_positives > 0 and state.first_positive_epoch is None:
            state.first_positive_epoch = epoch
        state.epochs_without_positives = 0 if stats.predicted_positives > 0 else state.epochs_without_positives + 1
        self._warn_val_loss(record["val_loss"])
        limit = health.max_epochs_without_positives
        if starved_of_positives(state.epochs_without_positives, limit):
            return {"stop": "health", "improved": improved,
                    "reason": no_positives_message(state.epochs_without_positives, limit)}
        patience = self.cfg.eval.early_stopping_patience
        if patience is not None and state.evals_without_improvement >= patience:
            return {"stop": "early", "improved": improved,
                    "reason": f"{self.cfg.eval.metric} did not improve for {patience} evaluations"}
        return {"stop": False, "reason": None, "improved": improved}

    def _warn_val_loss(self, val_loss: float) -> None:
        self.state.val_loss_history.append(val_loss)
        rises = self.cfg.health.val_loss_rise_epochs
        after_unfreeze = len(self.state.phases_ran) > 1
        if after_unfreeze and val_loss_rising(self.state.val_loss_history, rises):
            message = f"validation loss rose for {rises} evaluations in a row after an unfreeze"
            log.warning(message)
            self.tracker.log_event("warning", {"message": message, "epoch": self.state.epoch})

    # ------------------------------------------------------------ phases, logging, bad data

    def _enter_phase(self, epoch: int) -> None:
        phase = self.unfreeze.phase_index_at(epoch)
        if phase == self.state.phase:
            return
        info = self._apply_phase(phase)
        self.lr_schedule.on_phase_start(phase, self.state.step)
        self.state.phase = phase
        info = {**info, "epoch": epoch, "step": self.state.step}
        self.state.phases_ran.append(info)
        log.info("unfreeze phase %d from epoch %d: trains %s, %d trainable parameters", phase, epoch,
                 info["train"], info["trainable_params"])
        self.tracker.log_event("phase", info)

    def _apply_phase(self, phase: int) -> dict[str, Any]:
        """DDP trains what requires_grad says; DeepSpeed keeps every parameter registered and gated."""
        info = self.unfreeze.apply(self.engine.module, phase, set_requires_grad=self.engine.kind != "deepspeed")
        self.engine.on_phase_change()
        return info

    def _log_train(self, epoch: int, loss: float, images_per_s: float) -> None:
        lrs = [group["lr"] for group in self.engine.optimizer.param_groups]
        self.tracker.log_train(self.state.step, {
            "epoch": epoch + (self.state.step - self.state.epoch_start_step) / self.steps_per_epoch,
            "loss": loss, "lr": lrs, "images_per_s": images_per_s, "phase": self.state.phase,
            "accumulation": self.cfg.train.accumulation_steps})

    def _count_bad(self, batch: Batch) -> None:
        """Each corrupt sample once per epoch, however often a slot cycles past it."""
        for shard, key, reason in batch.bad:
            if (shard, key) not in self.bad_this_epoch:
                log.warning("rank %d skipped corrupt sample %s in %s: %s", self.env.rank, key, shard, reason)
                self.bad_this_epoch.add((shard, key))

    def _check_bad_fraction(self) -> None:
        """Corrupt samples as a fraction of the training set (slots are disjoint, so rank counts add up)."""
        bad = int(distributed.all_reduce_sum(self.env, torch.tensor([float(len(self.bad_this_epoch))]))[0])
        self.state.bad_samples = max(self.state.bad_samples, bad)
        self.bad_this_epoch = set()
        limit = self.cfg.data.max_bad_fraction
        if bad / max(self.train_counts.samples, 1) > limit:
            raise DataError(f"{bad} corrupt samples out of {self.train_counts.samples} exceed "
                            f"data.max_bad_fraction={limit}; the rank logs name each one")

    # ------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path:
        self.state.wall_time_s = self._wall_time()
        trainer_state = {"trainer": asdict(self.state), "lr_schedule": self.lr_schedule.state_dict(),
                         "engine_extra": _jsonable(self.engine.state_extra()),
                         "config": scrub_secrets(to_dict(self.cfg)),
                         "run_id": self.tracker.run_id, "steps_per_epoch": self.steps_per_epoch,
                         "shard_preprocessing": self.shard_preprocessing,
                         "workers": self.cfg.data.workers}
        per_rank = {"position": self.position.to_json(), "rng": _jsonable(distributed.rng_state())}
        path = self.checkpointer.save(self.state.step, self.engine, trainer_state, per_rank)
        self.tracker.log_event("checkpoint", {"path": str(path), "epoch": self.state.epoch, "step": self.state.step})
        return path

    def _resume(self, folder: Path) -> dict[str, Any]:
        saved = checkpoint.read_trainer_state(folder)
        self.state = TrainerState(**saved["trainer"])
        phase = self.state.phase
        if phase >= 0:
            self._apply_phase(phase)
        checkpoint.load_tensors(folder, self.engine, self.env, saved["world_size"])
        self.lr_schedule.load_state_dict(saved["lr_schedule"])
        self.engine.load_state_extra(_from_jsonable(saved["engine_extra"]))
        same_layout = saved["world_size"] == self.env.world_size and saved["workers"] == self.cfg.data.workers
        done = (self.state.step - self.state.epoch_start_step) * self.cfg.train.accumulation_steps
        if same_layout:
            mine = saved["per_rank"][self.env.rank]
            self.position = StreamPosition.from_json(mine["position"])
            distributed.set_rng_state(_from_jsonable(mine["rng"]))
        else:
            self.position = StreamPosition(micro_batches=done)
        self._resumed = {"from": str(folder), "step": self.state.step, "epoch": self.state.epoch,
                         "saved_world_size": saved["world_size"], "world_size": self.env.world_size,
                         "exact_position": same_layout}
        return saved

    def _announce(self, resume_from: Path | None, saved: dict[str, Any] | None) -> None:
        log.info("rank %d/%d on host %s (%s, %s)", self.env.rank, self.env.world_size, socket.gethostname(),
                 self.env.device, self.engine.kind)
        if saved:
            message = (f"resumed from {resume_from} at epoch {self.state.epoch}, step {self.state.step}; saved "
                       f"with world size {saved['world_size']}, now {self.env.world_size}")
            log.info(message)
            self.tracker.log_event("resume", self._resumed)

    def _wall_time(self) -> float:
        """Wall time across resumes: what earlier attempts spent plus this process's time."""
        return self.wall_base + time.monotonic() - self.started

    def summary(self) -> dict[str, Any]:
        ran = {phase["phase"] for phase in self.state.phases_ran}
        configured = list(range(len(self.cfg.unfreeze.phases)))
        return {"best_" + self.cfg.eval.metric: self.state.best_metric, "best_epoch": self.state.best_epoch,
                "epochs_to_first_positive": self.state.first_positive_epoch, "epochs_done": self.state.epoch,
                "steps": self.state.step, "wall_time_s": round(self._wall_time(), 2),
                "images_per_s": round(self.state.seen_samples / max(self._wall_time(), 1e-9), 2),
                "world_size": self.env.world_size, "engine": self.engine.kind,
                "phases_ran": self.state.phases_ran,
                "phases_not_run": [p for p in configured if p not in ran],
                "best_record": self.state.best_record, "best_checkpoint": self.state.best_checkpoint,
                "run_dir": str(self.run_dir)}


def _jsonable(value: Any) -> Any:
    """RNG states and scaler dicts as JSON (tensors and arrays to lists, tuples kept as lists)."""
    import numpy as np

    if isinstance(value, torch.Tensor):
        return {"__tensor__": value.tolist(), "dtype": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return {"__tuple__": [_jsonable(v) for v in value]} if isinstance(value, tuple) else \
            [_jsonable(v) for v in value]
    return value


def _from_jsonable(value: Any) -> Any:
    import numpy as np

    if isinstance(value, dict):
        if "__tensor__" in value:
            return torch.tensor(value["__tensor__"], dtype=getattr(torch, value["dtype"]))
        if "__ndarray__" in value:
            return np.array(value["__ndarray__"], dtype=value["dtype"])
        if "__tuple__" in value:
            return tuple(_from_jsonable(v) for v in value["__tuple__"])
        return {k: _from_jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_jsonable(v) for v in value]
    return value
